"""edgec search: the space, Pareto fronts, the best-point rule, and whole searches embedded and on a
real local Ray cluster (2 CPUs): the same trials give the same front both ways, a killed search
resumes, an invalid point is rejected before any training."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from edgec.base.errors import ConfigError
from edgec.search import make_setup, run_search, search
from edgec.search import runner as search_runner
from edgec.search import space as sp
from edgec.search.output import to_toml
from edgec.search.pareto import dominates, pareto_front, select_best, violations
from edgec.search.trial import runtime_settings
from support import run_cli

# A tiny chain on the built-in digits: a 2x2 grid (sparsity x precision) shares the trained model
# among all four trials and each pruned model between two.
BASE = {
    "seed": 0,
    "model": {"name": "mlp", "args": {"widths": [64, 32]}},
    "stages": ["train", "prune", "export"],
    "train": {"epochs": 4, "lr": 0.01},
    "prune": {"steps": 1, "retrain": {"epochs": 1, "lr": 0.003}},
}
FAST_LATENCY = {"repeats": 1, "runs": 30, "min_seconds": 0.05, "warmup": 2}
GRID = {"strategy": "grid", "space": {"prune.sparsity": [0.3, 0.6], "export.precision": ["fp32", "int8"]},
        "latency": FAST_LATENCY, "best": {"minimize": "transport_bytes", "max_accuracy_drop": 0.2}}
# latency is measured and reported, but the determinism checks rank on what is exactly reproducible
EXACT = ["accuracy", "transport_bytes"]


def config(**search_keys) -> dict:
    return {**BASE, "search": {**GRID, **search_keys}}


def _figures(summary: dict, target: str = "rpi") -> dict:
    keep = ("accuracy", "test_accuracy", "transport_bytes", "model_bytes", "fp32_bytes")
    return {t["id"]: {k: t["targets"][target]["metrics"].get(k) for k in keep} for t in summary["trials"]}


# -- the space ----------------------------------------------------------------------------------------

def test_grid_order_random_seeded_and_validation():
    spec = sp.parse_search({"space": {"a.x": [1, 2], "b.y": ["p", "q", "r"]}})
    assert sp.grid_points(spec)[:4] == [{"a.x": 1, "b.y": "p"}, {"a.x": 1, "b.y": "q"}, {"a.x": 1, "b.y": "r"},
                                        {"a.x": 2, "b.y": "p"}]
    assert spec.grid_size() == 6
    rnd = sp.parse_search({"strategy": "random", "trials": 5, "seed": 3,
                           "space": {"a.x": {"low": 1e-4, "high": 1e-1, "log": True}, "b.y": {"low": 1, "high": 8}}})
    points = sp.random_points(rnd)
    assert points == sp.random_points(rnd) and len(points) == 5
    assert all(1e-4 <= p["a.x"] <= 1e-1 and isinstance(p["b.y"], int) and 1 <= p["b.y"] <= 8 for p in points)
    assert sp.random_points(rnd.model_copy(update={"seed": 4})) != points
    # a small all-list space is sampled without replacement
    small = sp.parse_search({"strategy": "random", "trials": 6, "space": {"a.x": [1, 2], "b.y": [3, 4, 5]}})
    assert len({json.dumps(p, sort_keys=True) for p in sp.random_points(small)}) == 6
    for bad, message in (
        ({"strategy": "grid", "space": {"a.x": {"low": 0, "high": 1}}}, "needs a list"),
        ({"strategy": "tpe", "space": {"a.x": [1]}}, "needs trials"),
        ({"space": {"a.x": [1]}, "objectives": ["accuracy", "speed"]}, "unknown objective"),
        ({"space": {"a.x": []}}, "empty"),
        ({"space": {"a.x": {"low": 0, "high": 1, "log": True}}, "strategy": "random", "trials": 2}, "low > 0"),
        ({"space": {"a.x": [1]}, "typo": 1}, "unknown key"),
        (None, "[search]"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            sp.parse_search(bad)


def test_optuna_parameters_round_trip():
    spec = sp.parse_search({"strategy": "tpe", "trials": 2,
                            "space": {"prune.sparsity": [{"fc1": 0.9}, {"fc1": 0.95}], "train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                      "share.bits": {"low": 3, "high": 6}}})
    dists = sp.optuna_distributions(spec)
    assert set(dists) == {"p0", "p1", "p2"}
    point = sp.point_from_params(spec, {"p0": 1, "p1": 0.001, "p2": 4})
    assert point == {"prune.sparsity": {"fc1": 0.95}, "train.lr": 0.001, "share.bits": 4}
    assert sp.params_from_point(spec, point) == {"p0": 1, "p1": 0.001, "p2": 4}
    assert sp.params_from_point(spec, {**point, "share.bits": 9}) is None


# -- fronts and the rule -------------------------------------------------------------------------------

def test_pareto_front_latency_noise_ties():
    pts = {
        "a": {"accuracy": 0.98, "transport_bytes": 30_000, "p50_ms": 0.0050},
        "b": {"accuracy": 0.97, "transport_bytes": 20_000, "p50_ms": 0.0052},
        "c": {"accuracy": 0.97, "transport_bytes": 35_000, "p50_ms": 0.0045},  # worse than a, only "faster" by 10%
        "d": {"accuracy": 0.96, "transport_bytes": 40_000, "p50_ms": 0.0020},  # really faster: on the front
    }
    objectives = ["accuracy", "transport_bytes", "p50_ms"]
    assert pareto_front(pts, objectives, latency_tolerance=0.15) == ["a", "b", "d"]
    assert pareto_front(pts, objectives, latency_tolerance=0.0) == ["a", "b", "c", "d"]  # noise counted as speed
    assert dominates(pts["a"], pts["c"], objectives, 0.15) and not dominates(pts["c"], pts["a"], objectives, 0.15)
    assert pareto_front(pts, ["accuracy", "transport_bytes"], 0.1) == ["a", "b"]


def test_best_rule_uses_the_validation_accuracy_drop():
    rule = sp.BestRule(minimize="transport_bytes", max_accuracy_drop=0.005)
    cands = {"x": {"accuracy": 0.981, "transport_bytes": 30_000, "p50_ms": 1.0},
             "y": {"accuracy": 0.978, "transport_bytes": 25_000, "p50_ms": 1.0},
             "z": {"accuracy": 0.970, "transport_bytes": 10_000, "p50_ms": 1.0}}
    assert select_best(cands, rule, baseline=0.982, order={}) == "y"  # z drops 1.2 pt
    assert select_best(cands, sp.BestRule(minimize="transport_bytes", max_accuracy_drop=None), 0.982, {}) == "z"
    assert select_best(cands, sp.BestRule(minimize=None, maximize="accuracy"), 0.982, {}) == "x"
    assert select_best(cands, rule, baseline=0.999, order={}) is None


def test_budgets_make_a_point_infeasible():
    rec = {"status": "ok", "metrics": {"model_bytes": 3_000_000, "transport_bytes": 1000, "p95_ms": 1.0, "p50_ms": 0.5,
                                       "accuracy": 0.9}}
    assert violations(rec, {"max_model_bytes": 2_000_000, "max_transport_bytes": 500_000}) == [
        "model_bytes 3e+06 > max_model_bytes 2e+06"]
    assert violations(rec, {"min_accuracy": 0.95})[0].startswith("accuracy 0.9 < min_accuracy")
    assert violations({"status": "rejected", "reason": "precision 'fp16' is not offered"}, {}) == [
        "precision 'fp16' is not offered"]


def test_toml_writer_round_trips_a_config():
    from edgec.config import parse_config

    raw = {"seed": 3, "model": {"name": "mlp", "args": {"widths": [8]}},
           "stages": [{"kind": "train", "epochs": 1, "augment": {"enabled": True}},
                      {"kind": "prune", "id": "prune-a", "sparsity": {"fc1": 0.5, "fc2": 0.25}}, {"kind": "export"}]}
    canonical = parse_config(raw).canonical()
    assert parse_config(tomllib.loads(to_toml(canonical))).canonical() == canonical


def test_onnx_trials_use_cuda_only_where_present():
    settings = runtime_settings("onnxruntime", 2)
    import onnxruntime

    want = "CUDAExecutionProvider" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "CPUExecutionProvider"
    assert settings == {"threads": 2, "provider": want}
    assert runtime_settings("tflite", 1) == {"threads": 1}


# -- the driver with a stand-in trial (fast): tpe determinism, resume ----------------------------------

def _fake_trial(calls: list):
    """A stand-in for run_trial that writes a record of the stored schema (a restarted search reuses it)."""
    from edgec.search.records import expected_config

    def run(ctx, job, console=None):
        calls.append(job.point)
        if len(calls) == getattr(run, "die_at", 0):
            raise KeyboardInterrupt  # the search is killed while this trial runs
        x = float(job.point["train.lr"])
        metrics = {"accuracy": 1 - x, "test_accuracy": 1 - x, "reference_val_accuracy": None,
                   "reference_test_accuracy": None, "trained_val_accuracy": 1.0, "top1_agreement": None,
                   "model_bytes": 10, "transport_bytes": int(1e6 * x) + 1, "fp32_bytes": 40, "ratio": 4.0,
                   "p50_ms": 1.0, "p95_ms": 1.0, "val_samples": 10, "test_samples": None}
        latency = {"p50_ms": 1.0, "p95_ms": 1.0, "p50_ms_all": [1.0], "runtime": "fake", "settings": {}, "notes": []}
        target = {"status": "ok", "feasible": True, "reason": None, "metrics": metrics, "latency": latency,
                  "precision": "fp32", "stages": [], "bundle": None}
        return {"schema": "edgec-search-trial", "id": job.id, "number": job.number, "point": job.point, "status": "ok",
                "reason": None, "config": expected_config(ctx, job.point), "threads": ctx.threads, "stage_steps": 1,
                "stage_runs": 1, "seconds": 0.0, "targets": {t: dict(target) for t in ctx.targets}}
    return run


def _tpe_setup(tmp_path: Path, trials: int, out: str = "out") -> object:
    raw = {**BASE, "search": {"strategy": "tpe", "trials": trials, "seed": 7,
                              "space": {"train.lr": {"low": 1e-4, "high": 1e-1, "log": True}}}}
    return make_setup(raw, targets=["rpi"], out=tmp_path / out, cache_dir=tmp_path / "cache")


def test_tpe_is_seeded_and_resumes_from_finished_trials(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(search_runner, "run_trial", _fake_trial(calls))
    first = run_search(_tpe_setup(tmp_path, 6, "a"))
    again = run_search(_tpe_setup(tmp_path, 6, "b"))
    assert [r["point"] for r in first.records] == [r["point"] for r in again.records]
    assert len(calls) == 12 and [r["number"] for r in first.records] == list(range(6))
    # a longer search in the same folder reuses the six and asks for three more
    calls.clear()
    longer = run_search(_tpe_setup(tmp_path, 9, "a"))
    assert len(calls) == 3 and len(longer.records) == 9
    assert [r["point"] for r in longer.records[:6]] == [r["point"] for r in first.records]
    assert set(longer.ran) == {r["id"] for r in longer.records[6:]}


def test_killed_grid_search_reruns_only_unfinished_trials(tmp_path, monkeypatch):
    calls: list = []
    fake = _fake_trial(calls)
    fake.die_at = 3
    monkeypatch.setattr(search_runner, "run_trial", fake)
    raw = {**BASE, "search": {"space": {"train.lr": [0.01, 0.02, 0.03, 0.04]}}}
    setup = make_setup(raw, targets=["rpi"], out=tmp_path / "out", cache_dir=tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        run_search(setup)
    assert len(list((tmp_path / "out" / "trials").glob("*.json"))) == 2
    calls.clear()
    fake.die_at = 0
    outcome = run_search(setup)
    assert [p["train.lr"] for p in calls] == [0.03, 0.04]
    assert [r["point"]["train.lr"] for r in outcome.records] == [0.01, 0.02, 0.03, 0.04]


# -- real searches --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The 2x2 grid, embedded, for rpi and mobile (run once, compared with Ray below)."""
    root = tmp_path_factory.mktemp("serial")
    threads = torch.get_num_threads()
    result = search(config(objectives=EXACT), targets=["rpi", "mobile"], out=root / "out", cache_dir=root / "cache")
    assert torch.get_num_threads() == threads  # the trial's thread count does not leak
    return result


def test_embedded_search_writes_front_bundles_report_and_best(serial, tmp_path):
    summary = serial.summary
    out = serial.out
    assert summary["schema"] == "edgec-search" and summary["backend"] == "embedded" and len(summary["trials"]) == 4
    for trial in summary["trials"]:
        assert trial["status"] == "ok" and trial["config"]["stages"][1]["sparsity"] == trial["point"]["prune.sparsity"]
        for target in ("rpi", "mobile"):
            res = trial["targets"][target]
            m = res["metrics"]
            assert res["feasible"] and 0 < m["accuracy"] <= 1 and 0 < m["test_accuracy"] <= 1 and m["p50_ms"] > 0
            assert m["val_samples"] > 0 and m["ratio"] == pytest.approx(m["fp32_bytes"] / m["transport_bytes"])
            assert res["on_front"] == (trial["id"] in summary["targets"][target]["pareto"])
    # the front is computed on the validation accuracy: recompute it from search.json
    for target in ("rpi", "mobile"):
        metrics = {t["id"]: t["targets"][target]["metrics"] for t in summary["trials"]}
        assert summary["targets"][target]["pareto"] == pareto_front(metrics, EXACT, 0.1)
        for trial in serial.front(target):
            bundle = out / trial["targets"][target]["bundle"]
            from edgec.ondevice import load_bundle

            load_bundle(str(bundle)).require_intact()
            assert json.loads((bundle / "manifest.json").read_text())["target"]["name"] == target
        assert {p.name for p in (out / "report").glob("*.png")} >= {f"{target}-accuracy-vs-transport.png",
                                                                   f"{target}-accuracy-vs-p50.png"}
    assert not (out / "builds").exists()  # only the Pareto bundles are kept
    assert "Pareto front" in (out / "report.md").read_text() and "data:image/png;base64," in (out / "report.html").read_text()
    assert json.loads((out / "search.json").read_text())["trials"] == json.loads(json.dumps(summary["trials"], default=str))
    # the trained model is shared by all four trials, each pruned model by two, across both targets
    cache = summary["cache"]
    assert cache["stage_steps"] == 4 * 2 * 3 and cache["stage_runs"] == 1 + 2 + 8
    assert cache["stage_runs_saved"] == cache["stage_steps"] - cache["stage_runs"]
    assert len(list((out.parent / "cache" / "train").iterdir())) == 1

    # best.toml: the rule's pick as a build config; building it again is all cache hits
    best_id = summary["targets"]["rpi"]["best"]
    assert best_id is not None and (out / "best.toml").is_file() and (out / "best-mobile.toml").is_file()
    from edgec.api import build
    from edgec.config import parse_config

    cfg = parse_config(tomllib.loads((out / "best.toml").read_text()))
    best = next(t for t in summary["trials"] if t["id"] == best_id)
    assert cfg.target == "rpi" and {**cfg.canonical(), "out": None, "cache_dir": None, "target": None} == {
        **best["config"], "out": None, "cache_dir": None, "target": None}
    previous = torch.get_num_threads()
    torch.set_num_threads(summary["search"]["cpus_per_trial"])
    try:
        rebuilt = build(cfg, out=tmp_path / "o", cache_dir=out.parent / "cache")
    finally:
        torch.set_num_threads(previous)
    assert rebuilt.stages_run == 0
    assert [s.key for s in rebuilt.stages] == [s["key"] for s in best["targets"]["rpi"]["stages"]]


def test_invalid_points_are_rejected_before_training(tmp_path):
    # fp16 is not a precision of rpi, sparsity 1.5 is out of range: no point can be valid
    raw = {**BASE, "search": {"space": {"export.precision": ["fp16"], "prune.sparsity": [0.5, 1.5]},
                              "latency": FAST_LATENCY}}
    result = search(raw, targets=["rpi"], out=tmp_path / "out", cache_dir=tmp_path / "cache")
    trials = result.summary["trials"]
    assert [t["status"] for t in trials] == ["rejected", "rejected"]
    assert "precision 'fp16' is not offered by target 'rpi'" in trials[0]["reason"]
    assert "sparsity" in trials[1]["reason"]
    assert all(t["stage_runs"] == 0 and not t["targets"]["rpi"]["feasible"] for t in trials)
    assert not (tmp_path / "cache" / "train").exists()  # nothing was trained
    assert result.summary["targets"]["rpi"]["best"] is None and result.summary["targets"]["rpi"]["pareto"] == []


def test_cli_search_help_and_errors(tmp_path):
    text = run_cli("search", "--help", cwd=tmp_path).stdout
    for option in ("--config", "--target", "--ray", "--ray-address", "--cpus-per-trial", "--trials", "--strategy"):
        assert option in text
    (tmp_path / "s.toml").write_text('stages = ["train", "export"]\n')
    proc = run_cli("search", "-c", "s.toml", cwd=tmp_path, check=2)
    assert "[search]" in proc.stderr
    (tmp_path / "s.toml").write_text('[search.space]\n"train.epochs" = [1]\n')
    proc = run_cli("search", "-c", "s.toml", "--ray", "--ray-address", "auto", cwd=tmp_path, check=2)
    assert "not both" in proc.stderr
    proc = run_cli("search", "-c", "s.toml", "-t", "no-such-target", cwd=tmp_path, check=2)
    assert "no-such-target" in proc.stderr


@pytest.mark.parametrize("example", sorted((Path(__file__).resolve().parents[1] / "examples").glob("search-*.toml")),
                         ids=lambda p: p.name)
def test_search_examples_pass_the_plan_check(example, tmp_path):
    rows = json.loads(run_cli("search", "--config", example, "--dry-run", "--json", cwd=tmp_path).stdout)
    assert len(rows) >= 12 and all(t["status"] == "ok" for r in rows for t in r["targets"].values())
    assert not (tmp_path / "edgec-search").exists()


def test_dry_run_rejects_invalid_points_without_training(tmp_path):
    raw = {**BASE, "search": {"space": {"export.precision": ["fp16", "int8"]}}}
    (tmp_path / "s.toml").write_text(to_toml(raw))
    env = {"EDGEC_CACHE_DIR": str(tmp_path / "cache")}
    rows = json.loads(run_cli("search", "-c", "s.toml", "-t", "rpi", "-t", "mobile", "--dry-run", "--json",
                              cwd=tmp_path, env=env).stdout)
    assert rows[0]["targets"]["rpi"]["status"] == "rejected" and rows[0]["targets"]["mobile"]["status"] == "ok"
    assert rows[1]["targets"]["rpi"] == {"status": "ok", "stages": 3, "cached": 0}
    (tmp_path / "s.toml").write_text(to_toml({**raw, "search": {"space": {"export.precision": ["fp16"]}}}))
    proc = run_cli("search", "-c", "s.toml", "-t", "rpi", "--dry-run", cwd=tmp_path, env=env, check=2)
    assert "no point of the space passes the plan-time check" in proc.stderr
    assert not (tmp_path / "cache" / "train").exists()


# -- on a real local Ray cluster --------------------------------------------------------------------------

@pytest.fixture(scope="class")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[tune]')")
    from edgec.search.ray_backend import RAY_OBJECT_STORE_BYTES, WORKER_ENV

    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=RAY_OBJECT_STORE_BYTES, log_to_driver=False,
                 runtime_env={"env_vars": WORKER_ENV})
    except Exception as e:  # noqa: BLE001 - whatever stops Ray from starting here is the skip reason
        pytest.skip(f"a local Ray cluster cannot start on this machine: {type(e).__name__}: {e}")
    yield ray
    ray.shutdown()


class TestOnRay:
    def test_same_trials_same_front_as_serial(self, ray_cluster, serial, tmp_path):
        result = search(config(objectives=EXACT), targets=["rpi", "mobile"], out=tmp_path / "out",
                        cache_dir=tmp_path / "cache", use_ray=True)
        summary = result.summary
        assert summary["backend"] == "ray" and summary["ray"]["cpus"] == 2
        assert [t["id"] for t in summary["trials"]] == [t["id"] for t in serial.summary["trials"]]
        for target in ("rpi", "mobile"):
            assert _figures(summary, target) == _figures(serial.summary, target)
            assert summary["targets"][target]["pareto"] == serial.summary["targets"][target]["pareto"]
            assert summary["targets"][target]["best"] == serial.summary["targets"][target]["best"]
            keys = lambda s: {t["id"]: [st["key"] for st in t["targets"][target]["stages"]] for t in s["trials"]}  # noqa: E731
            assert keys(summary) == keys(serial.summary)  # byte-identical models: same cache keys all along
        # concurrent trials still train the shared model once and prune each sparsity once
        cache = tmp_path / "cache"
        assert len(list((cache / "train").iterdir())) == 1 and len(list((cache / "prune").iterdir())) == 2
        assert summary["cache"]["stage_runs"] == 1 + 2 + 8
        assert summary["cache"]["stage_runs_saved"] == serial.summary["cache"]["stage_runs_saved"]

    def test_tpe_on_ray(self, ray_cluster, tmp_path):
        raw = {**BASE, "stages": ["train", "export"],
               "search": {"strategy": "tpe", "trials": 3, "seed": 1, "objectives": ["accuracy", "transport_bytes", "p50_ms"],
                          "latency": FAST_LATENCY, "space": {"train.lr": {"low": 1e-3, "high": 3e-2, "log": True}}}}
        result = search(raw, targets=["rpi"], out=tmp_path / "out", cache_dir=tmp_path / "cache", use_ray=True)
        trials = result.summary["trials"]
        assert len(trials) == 3 and sorted(t["number"] for t in trials) == [0, 1, 2]
        assert all(t["status"] == "ok" and 1e-3 <= t["point"]["train.lr"] <= 3e-2 for t in trials)
        assert result.summary["targets"]["rpi"]["pareto"]


def test_killed_search_resumes_on_ray(tmp_path):
    """A real search (CLI, embedded) killed after its first finished trial, restarted with --ray: the
    finished trial is reused, the others run on a local 2-CPU cluster the CLI starts itself."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[tune]')")
    (tmp_path / "search.toml").write_text(to_toml({**BASE, "search": config()["search"]}))
    env = {**os.environ, "COLUMNS": "160", "EDGEC_CACHE_DIR": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "edgec", "search", "-c", "search.toml", "-t", "rpi", "-o", "out"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = tmp_path / "out" / "trials"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (trials.is_dir() and any(trials.glob("*.json"))) and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in trials.glob("*.json")}
    assert 1 <= len(done) < 4, "the search was not killed mid-way"
    out = run_cli("search", "-c", "search.toml", "-t", "rpi", "-o", "out", "--ray", "--ray-cpus", "2", "--json",
                  cwd=tmp_path, env=env)
    if "could not start or join a local Ray cluster" in out.stderr:
        pytest.skip(out.stderr.strip().splitlines()[-1])
    summary = json.loads(out.stdout)
    assert summary["backend"] == "ray" and len(summary["trials"]) == 4
    assert f"({len(done)} finished before, reused; {4 - len(done)} to run)" in out.stderr
    assert sum(t["reused"] for t in summary["trials"]) == len(done)
    assert {p.name: p.stat().st_mtime_ns for p in trials.glob("*.json") if p.name in done} == done
    assert all(t["status"] == "ok" for t in summary["trials"])


# -- GPU (skip cleanly without one) ----------------------------------------------------------------------

def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine (torch.cuda.is_available() is False)")


def test_training_stages_run_on_cuda(tmp_path):
    _cuda_or_skip()
    raw = {**BASE, "train": {"epochs": 2, "device": "cuda"}, "stages": ["train", "export"],
           "search": {"space": {"export.precision": ["fp32"]}, "latency": FAST_LATENCY}}
    result = search(raw, targets=["rpi"], out=tmp_path / "out", cache_dir=tmp_path / "cache")
    (trial,) = result.summary["trials"]
    assert trial["status"] == "ok" and trial["config"]["stages"][0]["device"] == "cuda"


def test_desktop_gpu_bundle_runs_on_the_cuda_provider(tmp_path):
    _cuda_or_skip()
    onnxruntime = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    raw = {**BASE, "stages": ["train", "export"], "search": {"space": {"export.precision": ["fp16", "fp32"]},
                                                             "latency": FAST_LATENCY}}
    result = search(raw, targets=["desktop-gpu"], out=tmp_path / "out", cache_dir=tmp_path / "cache")
    for trial in result.summary["trials"]:
        res = trial["targets"]["desktop-gpu"]
        assert res["status"] == "ok" and res["latency"]["settings"]["provider"] == "CUDAExecutionProvider"
