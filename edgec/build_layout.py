"""The names inside a build directory, ``OUT/<target>/`` of ``edgec build`` (and of each search trial),
defined once: the writer (``api``), the readers (``report``, ``bench --baseline / --reference``,
``search``) and the check that a folder may be replaced (``output_dir``) all use these."""

BUILD_FILE = "build.json"  # the build's summary: config, stages, figures
BUNDLE_DIR = "bundle"  # the verified bundle a device gets (when the chain ends with export)
MODEL_FILE = "model.pt"  # the model, when the chain ends on a model instead
REFERENCE_FILE = "reference.pt"  # the model the export converted: `edgec bench --reference`
UNCOMPRESSED_FILE = "uncompressed.pt"  # the model before the first compression stage: `edgec bench --baseline`
BENCH_FILE = "bench.json"  # `edgec bench --json` there is what `edgec report` reads by default
