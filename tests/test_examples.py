"""Every example config under examples/ is valid: `edgec build --config X --print-config` exits 0."""

import json
from pathlib import Path

import pytest

from support import run_cli

DEEP_COMPRESSION = {"mnist-lenet-300-100.toml": "lenet-300-100", "mnist-lenet-5.toml": "lenet-5"}
# search-*.toml hold a [search] table for `edgec search` (checked by tests/test_search.py with --dry-run)
EXAMPLES = sorted(p for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.toml") if not p.name.startswith("search-"))


def test_there_are_examples():
    assert set(DEEP_COMPRESSION) <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.name)
def test_example_config_validates(config, tmp_path):
    proc = run_cli("build", "--config", config, "--print-config", cwd=tmp_path)
    resolved = json.loads(proc.stdout)
    if config.name in DEEP_COMPRESSION:
        assert resolved["data"]["source"] == "mnist"  # the downloaded MNIST (edgec data fetch mnist): no silent fallback
        assert [s["kind"] for s in resolved["stages"]] == ["train", "prune", "retrain", "share", "export"]
        assert resolved["model"]["name"] == DEEP_COMPRESSION[config.name]
