"""A Raspberry Pi bundle verifies bit-exactly on an emulated aarch64 Raspberry Pi OS userland.

The emulated tests skip when qemu-aarch64-static is missing or EDGEC_SKIP_EMULATION=1. The first
run downloads the arm64 userland and the device wheels into edgec's cache (~20 s here); later runs
reuse it (a few seconds per emulated verify).
"""

import json
from pathlib import Path

import pytest

from edgec.base import emulation
from edgec.base.errors import ConfigError, InputError
from support import run_cli

# rpi: the quick start's bundle (the whole default chain on digits, shortened epochs); the others
# train and export only.
QUICK_START = ["--set", "budget.enforce=false", "--epochs", "8", "--set", "prune.steps=1", "--set", "retrain.epochs=3", "--set", "share.epochs=1",
               "--set", "distill.epochs=10"]
QUICK = ["--stages", "train,export", "--epochs", "8"]


def build_bundle(workdir: Path, target: str, *extra: str) -> Path:
    """A real bundle from the real CLI (digits, seconds of training)."""
    out = workdir / (target + "".join(extra).replace("-", "_"))
    run_cli("build", "--target", target, *(QUICK_START if target == "rpi" else QUICK), *extra, "--out", out,
            cwd=workdir, env={"EDGEC_CACHE_DIR": str(workdir / "cache")})
    return out / target / "bundle"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, arm64_cache) -> Path:
    return tmp_path_factory.mktemp("emulated")


@pytest.mark.parametrize("target, extra", [("rpi", ()), ("mobile", ()), ("mobile", ("--precision", "fp16"))])
def test_bundle_predictions_on_emulated_aarch64_equal_x86(workdir, target, extra):
    """ai-edge-litert (the Pi's default runtime) reproduces the build machine's outputs bit for bit;
    tflite-runtime 2.14 within the manifest's tolerance for it and with identical top-1 predictions."""
    bundle = build_bundle(workdir, target, *extra)
    files_before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    report = json.loads(run_cli("verify", bundle, "--emulate", "arm64", "--json", "-", cwd=workdir).stdout)
    runs = {run["emulation"]["runtime"]: run for run in report["runs"]}
    assert set(runs) == {"ai-edge-litert", "tflite-runtime"}
    for runtime, run in runs.items():
        assert run["ok"], run.get("errors")
        assert run["emulation"]["machine"] == "aarch64" and run["emulation"]["runtime_version"]
        assert run["top1_agreement"] == 1.0
    litert = runs["ai-edge-litert"]
    int8 = not extra
    assert litert["emulation"]["exact"] == int8 and litert["test_vectors"]["n_failed"] == 0
    if int8:
        assert litert["max_abs_diff"] == 0.0
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == files_before, "verify must not touch the bundle"


def test_missing_qemu_is_a_one_line_input_error(monkeypatch, tmp_path):
    monkeypatch.setattr(emulation.shutil, "which", lambda name: None)
    with pytest.raises(InputError, match=r"apt-get install qemu-user-static") as error:
        emulation.prepare_arm64_python(tmp_path)
    assert "\n" not in str(error.value)


def test_unknown_runtime_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="tflite-runtime"):
        emulation.prepare_arm64_python(tmp_path, runtime="onnxruntime")
