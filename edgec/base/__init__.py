"""The base layer: what edgec.pipeline, edgec.targets and the top (cli, api, config, report)
all build on. Nothing here imports from those layers."""
