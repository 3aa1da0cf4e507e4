"""End to end beyond classification (issue 17): an autoencoder scored by reconstruction error and a
regression build, verify and bench on every target, from tiny data; the full compression chain,
the export gate, the on-device runner's figures and the report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgec.api import build
from edgec.base.errors import RunError
from edgec.ondevice import bench_bundle, load_bundle, verify_bundle
from edgec.pipeline.algorithms.output_range import representable

from support import reseal_manifest, run_cli

TARGETS = ("rpi", "mobile", "desktop-gpu")
ROOT = Path(__file__).resolve().parents[1]


def anomaly_config(**stage_keys):
    return {"task": "reconstruction", "data": {"source": "digits", "normal": [0]},
            "model": {"name": "autoencoder", "args": {"widths": [32, 16], "bottleneck": 4}},
            "stages": [{"kind": "train", "epochs": 15, "lr": 3e-3}, {"kind": "export", **stage_keys}]}


@pytest.fixture(scope="module")
def regression_npz(tmp_path_factory) -> Path:
    """A small physical function with two outputs: a projectile's range and peak height for a launch
    speed and angle (and two irrelevant features), in metres."""
    rng = np.random.default_rng(0)
    n = 400
    speed, angle = rng.uniform(5, 30, n), rng.uniform(0.2, 1.3, n)
    x = np.stack([speed, angle, rng.normal(size=n), rng.normal(size=n)], 1).astype(np.float32)
    g = 9.81
    y = np.stack([speed ** 2 * np.sin(2 * angle) / g, (speed * np.sin(angle)) ** 2 / (2 * g)], 1).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "projectile.npz"
    np.savez(path, x_train=x[:320], y_train=y[:320], x_test=x[320:], y_test=y[320:])
    return path


def regression_config(path: Path, **stage_keys):
    return {"task": "regression", "data": {"source": f"npz:{path}"},
            "model": {"name": "mlp", "args": {"widths": [32, 32]}},
            "stages": [{"kind": "train", "epochs": 60, "lr": 3e-3}, {"kind": "export", **stage_keys}]}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("beyond")


@pytest.fixture(scope="module")
def bundles(work, regression_npz):
    """Both task kinds for every target (the train stage is built once per task, from the cache)."""
    made = {}
    for task, config in (("reconstruction", anomaly_config()), ("regression", regression_config(regression_npz))):
        for target in TARGETS:
            result = build(config, target=target, out=work / task, cache_dir=work / "cache")
            made[task, target] = result
    return made


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("task", ["reconstruction", "regression"])
def test_every_target_builds_verifies_and_benches(bundles, task, target):
    result = bundles[task, target]
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert manifest["task"] == task and manifest["tolerance"]["metric"] == 0.01
    metrics = manifest["metrics"]
    figure = "auc" if task == "reconstruction" else "r2"
    assert metrics["metric"] == figure and metrics["relative_error"] < 0.1
    assert abs(metrics[figure] - metrics[f"reference_{figure}"]) <= 0.01
    assert result.stages[0].info["task"] == task and figure in result.stages[0].info
    verified = verify_bundle(str(result.bundle))
    assert verified["ok"], verified["errors"]
    assert {c["name"] for c in verified["checks"] if c["ok"]} >= {"integrity", "transport", "load", "test_vectors",
                                                                  "quality"}
    assert verified["quality"]["metric"] == figure
    assert verified["quality"]["value"] == pytest.approx(metrics[f"eval_{figure}"], abs=1e-6)
    bench = bench_bundle(str(result.bundle), runs=10, min_seconds=0.05, sweep=False, batch_sizes=(1,), isolate=False,
                         warmup=1, warmup_seconds=0.01)
    assert bench["ok"] and bench["latency_ms"]["p50"] > 0 and bench["accuracy"] is None
    assert bench["quality"]["value"] == pytest.approx(verified["quality"]["value"])


def test_anomaly_scores_separate_the_anomalous_digits(bundles):
    result = bundles["reconstruction", "rpi"]
    assert result.metrics["auc"] > 0.7 and result.metrics["anomalous_test_samples"] > 0
    assert "reconstruction" in result.summary["data"]


def test_int8_autoencoder_output_covers_the_input_range(bundles):
    manifest = json.loads((bundles["reconstruction", "rpi"].bundle / "manifest.json").read_text())
    q = manifest["outputs"][0]["quantization"]
    lo, hi = representable(q["scale"], q["zero_point"])
    assert lo <= 0.0 and hi >= 1.0 - q["scale"] / 2  # digits are scaled to [0, 1]
    if manifest["conversion"].get("output_range_widened"):
        assert manifest["conversion"]["output_range_widened"]["after"][1] >= 1.0 - q["scale"] / 2


def test_regression_bundle_reports_real_units(bundles, regression_npz):
    result = bundles["regression", "rpi"]
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    post = manifest["postprocessing"]
    assert len(post["scale"]) == len(post["offset"]) == 2 and manifest["labels"] == ["y0", "y1"]
    assert result.metrics["r2"] > 0.8
    bundle = load_bundle(str(result.bundle))
    x, y = bundle.eval_set()
    assert y.shape[1] == 2 and y.dtype == np.float64
    model = bundle.open_model()
    from edgec.ondevice.evaluate import predict_labels

    preds = predict_labels(model, x[:5], bundle.labels())
    model.close()
    assert [len(p["values"]) for p in preds] == [2] * 5
    assert np.abs(np.array([p["values"] for p in preds]) - y[:5]).mean() < 0.5 * np.abs(y[:5]).mean()


def test_bundle_runner_verifies_on_its_own(bundles, tmp_path):
    """run.py in each bundle (numpy + runtime, its own copy of the runner) checks the task's figure."""
    for task in ("reconstruction", "regression"):
        bundle = bundles[task, "rpi"].bundle
        proc = subprocess.run([sys.executable, "run.py", "verify", "--json", "-"], cwd=bundle, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["quality"]["metric"] in ("auc", "r2")
    np.save(tmp_path / "x.npy", np.load(bundles["reconstruction", "rpi"].bundle / "eval.npz")["x"][:3])
    proc = subprocess.run([sys.executable, "run.py", "predict", str(tmp_path / "x.npy")],
                          cwd=bundles["reconstruction", "rpi"].bundle, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()  # one header line naming the score, then a row per sample
    assert proc.returncode == 0 and "anomaly score" in lines[0] and len(lines) == 4


def test_verify_fails_when_the_figure_drops(bundles, tmp_path):
    """A manifest promising a better eval figure than the model gives fails the quality check."""
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundles["regression", "mobile"].bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["metrics"]["eval_r2"] < 0.9999
    manifest["metrics"]["eval_r2"], manifest["tolerance"]["metric"] = 1.0, 0.0
    (copy / "manifest.json").write_text(json.dumps(manifest))
    reseal_manifest(copy)
    verified = verify_bundle(str(copy))
    assert not verified["ok"] and any(e.startswith("quality: r2") for e in verified["errors"])


def test_report_draws_the_task_plots(bundles):
    from edgec.report import write_report

    paths = write_report(bundles["reconstruction", "rpi"].build_dir)
    assert {"reconstructions", "error_histogram", "roc"} <= set(paths)
    assert "Reconstruction of the shipped bundle" in paths["markdown"].read_text()
    paths = write_report(bundles["regression", "rpi"].build_dir)
    assert "predicted_vs_true" in paths and "confusion" not in paths


def test_export_gate_refuses_a_bundle_too_far_from_the_reference(work, regression_npz):
    with pytest.raises(RunError, match="relative output error"):
        build(regression_config(regression_npz, max_relative_error=1e-9), target="rpi", out=work / "gate",
              cache_dir=work / "cache")
    assert not (work / "gate" / "rpi").exists()


@pytest.mark.parametrize("task", ["reconstruction", "regression"])
def test_full_compression_chain(work, regression_npz, task):
    """train, distill (MSE to the teacher), prune, retrain, share, export: every stage honours the task."""
    base = anomaly_config() if task == "reconstruction" else regression_config(regression_npz)
    figure = "auc" if task == "reconstruction" else "r2"
    # short stages with explicit settings: the chain's mechanics are under test, so the budget only records
    config = {**base, "budget": {"enforce": False}, "stages": [base["stages"][0], {"kind": "distill", "epochs": 10, "lr": 3e-3, "width": 0.5},
                                 {"kind": "prune", "sparsity": 0.5, "steps": 2, "retrain": {"epochs": 2}},
                                 {"kind": "retrain", "epochs": 5}, {"kind": "share", "bits": 5, "epochs": 2},
                                 {"kind": "export"}]}
    result = build(config, target="rpi", out=work / f"chain-{task}", cache_dir=work / "cache")
    infos = {s.id: s.info for s in result.stages}
    assert all(infos[s]["task"] == task and infos[s][figure] is not None for s in ("train", "distill", "prune", "retrain", "share"))
    assert infos["distill"]["params"] < infos["train"]["params"]
    assert infos["share"]["sparsity"]["total"]["sparsity"] >= 0.45
    assert max(infos["share"]["distinct_values"].values()) <= 32
    assert verify_bundle(str(result.bundle))["ok"]
    gap = infos["share"][figure] - result.metrics[figure]
    assert gap <= 0.02


def test_denoising_conv_autoencoder(work):
    config = {"task": "reconstruction", "data": {"source": "digits", "normal": [1], "input_noise": 0.2},
              "model": {"name": "conv-autoencoder", "args": {"channels": [4, 8], "output": "sigmoid"}},
              "stages": [{"kind": "train", "epochs": 10, "lr": 3e-3}, {"kind": "export"}]}
    result = build(config, target="rpi", out=work / "conv", cache_dir=work / "cache")
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert manifest["outputs"][0]["shape"] == [1, 1, 8, 8]
    assert manifest["outputs"][0]["quantization"] == {"scale": 1 / 256, "zero_point": -128}  # sigmoid: [0, 1)
    assert verify_bundle(str(result.bundle))["ok"]


def test_cli_builds_from_the_example_config(tmp_path):
    proc = run_cli("build", "--config", ROOT / "examples" / "regression.toml", "--stages", "train,export",
                   "--set", "train.epochs=3", "--out", tmp_path / "out", "--json", cwd=tmp_path,
                   env={"EDGEC_CACHE_DIR": str(tmp_path / "cache")})
    summary = json.loads(proc.stdout)
    assert summary["stages"][-1]["info"]["metric"] == "r2"
    assert (tmp_path / "out" / "rpi" / "bundle" / "manifest.json").is_file()


def test_classification_bundles_have_no_task_fields(tmp_path):
    result = build({"model": {"name": "mlp", "args": {"widths": [8]}}, "stages": [{"kind": "train", "epochs": 1},
                                                                                {"kind": "export"}]},
                   target="rpi", out=tmp_path / "out", cache_dir=tmp_path / "cache")
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert "task" not in manifest and "postprocessing" not in manifest and "metric" not in manifest["tolerance"]
    assert "accuracy" in result.stages[0].info and "task" not in result.stages[0].info
