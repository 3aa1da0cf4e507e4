"""Hostile inputs (issue 22, low items): each ends as one clean line, exit 2 for bad input (1 for a
failed run), no traceback, nothing published; through the real CLI wherever the CLI reads the input.

Only two tests train (1 epoch, tiny models): the shared build behind the key-file and report tests,
and the diverging run."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from support import run_cli
from test_cli_errors import run_failing

BUILD = ["build", "--target", "desktop-gpu", "--model", "mlp", "--epochs", "1", "--stages", "train,export",
         "--set", "export.precision=fp32"]


def last_line(proc) -> str:
    """The error line: the last line of stderr (progress lines may come before it), no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "internal error" not in line, proc.stderr
    return line


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """A tiny real build (never modified: tests copy what they change)."""
    tmp = tmp_path_factory.mktemp("hostile")
    run_cli(*BUILD, "--out", tmp / "out", "--cache-dir", tmp / "cache", cwd=tmp)
    return tmp / "out" / "desktop-gpu"


# --- 6: architecture records name modules only --------------------------------------------------


@pytest.mark.parametrize("child, path", [("update", "extra"), ("__class__", "extra"), ("x", "hidden.forward")])
def test_architecture_record_module_names_are_checked(tmp_path, child, path):
    from edgec.base import architecture
    from edgec.base.architecture import ModelTrust
    from edgec.base.checkpoint import Checkpoint

    arch = architecture.record(architecture.zoo_base("mlp", (1, 8, 8), 10))
    state = architecture.build(arch, ModelTrust()).state_dict()
    arch["edits"] = [{"op": "set_module", "path": path,
                      "module": {"type": "ModuleDict", "children": {child: {"type": "ReLU", "args": {}}}}}]
    Checkpoint(arch, state).save(tmp_path / "ckpt.pt")
    proc = run_cli("build", "--weights", "ckpt.pt", "--out", "out", "--epochs", "1", cwd=tmp_path, check=2)
    bad = path.rsplit(".", 1)[-1] if child == "x" else child
    assert f"names a module {bad!r}, which is not a valid module name" in last_line(proc)
    assert not (tmp_path / "out").exists()


# --- 8: key files are regular files of bounded size -------------------------------------------


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "key.fifo"
    os.mkfifo(path)
    return path


def test_sign_key_fifo_is_refused_without_blocking(tmp_path, fifo):
    for key in (fifo, "/dev/zero"):
        proc = subprocess.run([sys.executable, "-m", "edgec", "build", "--sign-key", str(key), "--out", "out"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"signing key {key} is not a regular file" in last_line(proc)
    assert not (tmp_path / "out").exists()


def test_public_key_must_be_a_regular_file(build_dir, fifo):
    for key in (fifo, "/dev/zero"):
        proc = run_cli("verify", build_dir / "bundle", "--public-key", key, cwd=build_dir.parent, check=2)
        assert f"public key {key} is not a regular file" in last_line(proc)
        device = subprocess.run([sys.executable, "run.py", "verify", "--public-key", str(key)], cwd=build_dir / "bundle",
                                capture_output=True, text=True, timeout=120)
        assert device.returncode == 2 and f"public key {key} is not a regular file" in device.stderr, device.stderr
        assert "Traceback" not in device.stderr


# --- 9: a diverged run is not published ---------------------------------------------------------


def test_non_finite_weights_are_refused(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:, None] / 16.0 * 1e38).astype(np.float32)  # finite, but its squares are not
    y = digits.target.astype(np.int64)
    np.savez(tmp_path / "big.npz", x_train=x[:300], y_train=y[:300], x_test=x[300:400], y_test=y[300:400])
    proc = run_cli("build", "--data", "npz:big.npz", "--model", "cnn-small", "--target", "desktop-gpu", "--epochs", "1",
                   "--stages", "train,export", "--out", "out", "--cache-dir", "cache", cwd=tmp_path, check=1)
    line = last_line(proc)
    assert "stage 'train' produced NaN or infinite values in" in line and "running_var" in line
    assert "scale the inputs" in line
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "cache").glob("train/*"))  # nothing cached either


# --- 10: nesting is bounded in every TOML edgec reads ------------------------------------------


DEEP = "[" * 3000 + "]" * 3000


@pytest.mark.parametrize("where", ["config", "set", "target", "search"])
def test_deeply_nested_toml_is_refused(tmp_path, where):
    (tmp_path / "deep.toml").write_text(f"seed = 0\nx = {DEEP}\n")
    args = {"config": ["build", "--config", "deep.toml", "--print-config"],
            "set": ["build", "--set", f"model.args.widths={DEEP}", "--print-config"],
            "target": ["build", "--target", "./deep.toml", "--out", "out"],
            "search": ["search", "--config", "deep.toml", "--dry-run", "--out", "out"]}[where]
    proc = run_cli(*args, cwd=tmp_path, check=2)
    assert "arrays or tables are nested more than 32 deep" in last_line(proc)
    assert not (tmp_path / "out").exists()


# --- 11: --set stages=[...] sets the stage list -------------------------------------------------


def test_set_stages_sets_the_stage_list(tmp_path):
    proc = run_cli("build", "--set", 'stages=["train", "export"]', "--set", "train.epochs=2", "--print-config",
                   cwd=tmp_path)
    stages = json.loads(proc.stdout)["stages"]
    assert [(s["id"], s.get("epochs")) for s in stages] == [("train", 2), ("export", None)]
    proc = run_cli("build", "--set", "stages.0.epochs=3", "--print-config", cwd=tmp_path, check=2)
    assert "--set stages.0.epochs: address a stage by its id or kind" in last_line(proc)


# --- 12: a model too big for memory is refused at plan time; allocator failures are out of memory


def test_huge_model_is_refused_before_allocating(tmp_path):
    proc = run_cli("build", "--model", "mlp", "--set", "model.args.widths=[1000000000]", "--out", "out",
                   cwd=tmp_path, check=2)
    line = last_line(proc)
    assert "parameters" in line and "GiB of memory: choose smaller [model] args" in line
    assert not (tmp_path / "out").exists()


def test_allocator_failure_is_reported_as_out_of_memory(tmp_path):
    proc = run_failing(tmp_path, "    import torch\n    torch.empty(2**60, dtype=torch.uint8)")
    assert proc.returncode == 1, proc.stderr
    assert last_line(proc).startswith("error: out of memory;")


# --- 13: build.json is checked before the report uses it ---------------------------------------


@pytest.mark.parametrize("field, value, message", [
    (("stages", 0, "info", "accuracy"), "high", "stages[0].info.accuracy: Input should be a valid number"),
    (("stages", 1, "info", "transport_bytes"), -5, "stages[1].info.transport_bytes: Input should be greater than"),
    (("stages", 0, "key"), "../../etc", "stages[0].key: String should match pattern"),
    (("seed",), "0", "seed: Input should be a valid integer"),
])
def test_report_refuses_a_damaged_build_json(build_dir, tmp_path, field, value, message):
    copy = tmp_path / "desktop-gpu"
    shutil.copytree(build_dir, copy)
    summary = json.loads((copy / "build.json").read_text())
    node = summary
    for part in field[:-1]:
        node = node[part]
    node[field[-1]] = value
    (copy / "build.json").write_text(json.dumps(summary))
    for name in ("report.html", "report.md"):
        (copy / name).unlink(missing_ok=True)
    proc = run_cli("report", copy, cwd=tmp_path, check=2)
    assert message in last_line(proc)
    assert not (copy / "report.html").exists()


def test_report_accepts_the_build_json_edgec_wrote(build_dir, tmp_path):
    copy = tmp_path / "desktop-gpu"
    shutil.copytree(build_dir, copy)
    run_cli("report", copy, cwd=tmp_path)
    assert (copy / "report.html").is_file()
