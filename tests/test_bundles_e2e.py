"""End-to-end: build a bundle for every target with the real CLI, load it in its real runtime,
corrupt it, bench it, check its budgets."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from support import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
QUICK = ["--stages", "train,export", "--epochs", "8"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bundles")


def build(workdir: Path, target: str, *extra, out="out", check=0, env=None):
    return run_cli("build", "--target", target, *QUICK, "--out", workdir / out, *extra, "--json",
                   cwd=workdir, env={"EDGEC_CACHE_DIR": str(workdir / "cache"), **(env or {})}, check=check)


@pytest.fixture(scope="module")
def bundles(workdir):
    """One bundle per built-in target (and mobile fp16), built once for the module."""
    made = {}
    for target, extra, out in (("rpi", [], "out"), ("mobile", [], "out"), ("desktop-gpu", [], "out"),
                               ("mobile", ["--precision", "fp16"], "fp16")):
        build(workdir, target, *extra, out=out)
        made[f"{target}{'-' + extra[1] if extra else ''}"] = workdir / out / target / "bundle"
    return made


@pytest.mark.parametrize(
    "name, model_file, dtype",
    [("rpi", "model.tflite", "int8"), ("mobile", "model.tflite", "int8"),
     ("desktop-gpu", "model.onnx", "float32"), ("mobile-fp16", "model.tflite", "float32")],
)
def test_every_target_yields_a_verified_bundle(bundles, workdir, name, model_file, dtype):
    bundle = bundles[name]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["model_file"] == model_file
    assert manifest["inputs"][0]["dtype"] == dtype
    for key in ("reference_accuracy", "accuracy", "top1_agreement", "max_abs_diff"):
        assert key in manifest["metrics"]
    assert manifest["metrics"]["top1_agreement"] >= 0.99
    for key in ("reference_fp32_bytes", "model_bytes", "transport_bytes"):
        assert manifest["size"][key] > 0
    assert [s["stage"] for s in manifest["lineage"]] == ["train", "export"]
    for required in ("run.py", "edgec_ondevice/__init__.py", "eval.npz", "test_vectors.npz", "labels.txt", "requirements.txt"):
        assert (bundle / required).is_file(), required
    result = json.loads(run_cli("verify", bundle, "--json", "-", cwd=workdir).stdout)
    assert result["ok"] and result["test_vectors"]["n_failed"] == 0
    assert {c["name"] for c in result["checks"] if c["ok"]} >= {"integrity", "transport", "load", "test_vectors", "accuracy"}


def test_rpi_bundle_is_full_integer_and_installs_ai_edge_litert(bundles):
    manifest = json.loads((bundles["rpi"] / "manifest.json").read_text())
    assert manifest["inputs"][0]["dtype"] == manifest["outputs"][0]["dtype"] == "int8"
    assert manifest["inputs"][0]["quantization"]["scale"] > 0
    assert "ai-edge-litert==2.3.0" in (bundles["rpi"] / "requirements.txt").read_text().splitlines()
    assert set(manifest["tolerance"]["runtimes"]) == {"ai-edge-litert", "tflite-runtime"}


def test_desktop_gpu_ships_fp16_with_fp32_fallback(bundles):
    manifest = json.loads((bundles["desktop-gpu"] / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and "model.fp32.onnx" in manifest["extra_model_files"]
    assert manifest["runtime"]["recommended"]["provider"] == "TensorrtExecutionProvider"


def test_builds_are_byte_identical(workdir, bundles):
    """Same seed and inputs: identical weights, model file and manifest (fresh cache, fresh out)."""
    build(workdir, "rpi", out="again", env={"EDGEC_CACHE_DIR": str(workdir / "cache-again")})
    first, second = bundles["rpi"], workdir / "again" / "rpi" / "bundle"
    for name in ("manifest.json", "model.tflite", "test_vectors.npz", "eval.npz"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first.parent / "reference.pt").read_bytes() == (second.parent / "reference.pt").read_bytes()


@pytest.mark.parametrize("victim", ["model.tflite", "model.tflite.edgt", "eval.npz", "edgec_ondevice/runtimes.py"])
def test_one_flipped_byte_is_caught(bundles, workdir, tmp_path, victim):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["rpi"], bundle)
    data = bytearray((bundle / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / victim).write_bytes(bytes(data))
    proc = run_cli("verify", bundle, cwd=workdir, check=1)
    assert victim in proc.stdout + proc.stderr


def test_refuses_to_ship_on_mismatch(workdir):
    board = workdir / "strict-board.toml"
    board.write_text(
        'name = "strict"\nformat = "tflite"\nprecision = "int8"\nprecisions = ["int8"]\n'
        'requirements = ["ai-edge-litert>=2.3"]\n[budgets]\nmin_logit_snr_db = 200.0\n'
    )  # an output SNR no int8 model reaches: the parity gate refuses
    proc = build(workdir, str(board), out="strict", check=1)
    assert "does not match the reference" in proc.stderr and "SNR" in proc.stderr
    # the safe remedies were tried before refusing, and the op adding the most int8 error is named
    assert "tried automatically: minmax activation observer" in proc.stderr
    assert "the op adding the most int8 error is" in proc.stderr
    assert not (workdir / "strict" / "strict").exists()


def test_user_model_with_batchnorm_residual_and_gap(workdir):
    # 16 channels: with 8 the int8 model agreed on 0.98 of the digits test split, and export refused it.
    out = json.loads(build(workdir, "rpi", "--model", "user_models:make", "--epochs", "20",
                           "--set", "model.args.channels=16", out="user", env={"PYTHONPATH": str(FIXTURES)}).stdout)
    assert out["stages"][-1]["info"]["top1_agreement"] >= 0.99
    run_cli("verify", workdir / "user" / "rpi" / "bundle", cwd=workdir)


def test_bench_check_and_compare(bundles, workdir, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["rpi"], bundle)
    shutil.copy2(bundles["rpi"].parent / "reference.pt", tmp_path / "reference.pt")
    result_a, result_b = tmp_path / "a.json", tmp_path / "b.json"
    run_cli("bench", bundle, "--runs", "50", "--min-seconds", "0.1", "--batch-sizes", "1", "--reference",
            "--json", result_a, cwd=workdir)
    bench = json.loads(result_a.read_text())
    assert bench["schema"] == "edgec-bench" and bench["latency_ms"]["p50"] > 0
    assert bench["reference"]["latency_ms"]["p50"] > 0 and bench["reference"]["speedup_p50"] > 0
    saved = json.loads((bundle / "recommended.json").read_text())
    assert saved["machines"][bench["machine_key"]]["settings"] == bench["recommended"]
    run_cli("verify", bundle, cwd=workdir)  # the recommendation lives beside the manifest: the bundle stays verifiable

    ok = json.loads(run_cli("check", bundle, "--bench", result_a, "--max-p95-ms", "1000", "--json", "-", cwd=workdir).stdout)
    assert all(row["ok"] for row in ok["budgets"])
    proc = run_cli("check", bundle, "--max-model-bytes", "10", "--min-agreement", "1.0", cwd=workdir, check=1)
    assert "max_model_bytes" in proc.stderr

    slower = dict(bench, latency_ms={k: v * 2 for k, v in bench["latency_ms"].items()})
    result_b.write_text(json.dumps(slower))
    proc = run_cli("bench", "--compare", result_a, "--compare", result_b, cwd=workdir, check=1)
    assert "REGRESSION" in proc.stdout and "latency_ms.p50" in proc.stdout


@pytest.mark.parametrize("command", ["verify", "bench", "check"])
def test_not_a_bundle(workdir, tmp_path, command):
    proc = run_cli(command, tmp_path, cwd=workdir, check=2)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_newer_manifest_schema_is_refused(bundles, workdir, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["mobile"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("verify", bundle, cwd=workdir, check=2)
    assert "newer" in proc.stderr


def test_compare_refuses_other_json(workdir, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something-else"}))
    proc = run_cli("bench", "--compare", other, "--compare", other, cwd=workdir, check=2)
    assert "not an edgec bench result" in proc.stderr


def test_bundle_runs_without_torch(bundles, tmp_path):
    """The bundle's own runner needs numpy and the runtime only: torch is made unimportable."""
    import subprocess
    import sys

    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not on the device')\n")
    proc = subprocess.run([sys.executable, "run.py", "verify"], cwd=bundles["rpi"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert np.load(bundles["rpi"] / "eval.npz")["x"].dtype == np.uint8
