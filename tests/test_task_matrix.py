"""Every stage that was classification-only (learn, grow, search) against every other task: each
(stage/method, task) pair either builds through the real CLI (a tiny model, 1 epoch) and records the
task's figure (regression: R^2, reconstruction: ROC AUC of the reconstruction error), or is refused
at plan time: exit 2, one line naming the stage, the method and the task, no stage run, nothing written.

The table is the README's "which stage works for which task" (Beyond classification)."""

import json
from pathlib import Path

import pytest
import torch

from support import run_cli

REGRESSION = {"data": {"source": "diabetes"}, "model": {"name": "mlp", "args": {"widths": [16]}}}
RECONSTRUCTION = {"task": "reconstruction", "data": {"source": "digits", "normal": [0]},
                  "model": {"name": "autoencoder", "args": {"widths": [16], "bottleneck": 4}}}
BASES = {"regression": REGRESSION, "reconstruction": RECONSTRUCTION}
FIGURE = {"regression": "r2", "reconstruction": "auc"}
HIDDEN = {"regression": "hidden.0", "reconstruction": "encoder.0"}  # a hidden Linear of each model
TRAIN = {"kind": "train", "epochs": 1, "lr": 3e-3}

LEARN_METHODS = ("finetune", "features", "joint", "lwf", "ewc", "packnet", "piggyback", "icarl")
# (stage, method, task) -> what must happen: "builds", or the words the one-line refusal must hold
MATRIX = {
    **{("learn", m, "regression"): "builds" for m in LEARN_METHODS if m not in ("joint", "piggyback", "icarl")},
    ("learn", "joint", "regression"): 'method = "joint"',
    ("learn", "piggyback", "regression"): 'method = "piggyback"',
    ("learn", "icarl", "regression"): 'method = "icarl" adds classes to a classifier',
    **{("learn", m, "reconstruction"): f'method = "{m}" cannot learn task = "reconstruction"' for m in LEARN_METHODS},
    **{("grow", op, task): "builds" for op in ("wider", "deeper") for task in BASES},
    **{("grow", "classes", task): f"classes = N adds classes to a classifier; this build's task is '{task}'"
       for task in BASES},
    **{("search", "grid", task): f"edgec search ranks classifiers by top-1 accuracy; this config's task is '{task}'"
       for task in BASES},
}


def toml(value) -> str:
    """The few TOML forms these configs need (JSON scalars and lists are TOML; keys quoted)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return json.dumps(value)


def toml_file(config: dict) -> str:
    """Top-level keys, then each table (sub-tables inline), then the [[stages]] array."""
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    lines = [f"{json.dumps(k)} = {toml(v)}" for k, v in config.items() if k not in tables and k != "stages"]
    for name, table in tables.items():
        lines += [f"[{name}]", *(f"{json.dumps(k)} = {toml(v)}" for k, v in table.items())]
    for stage in config.get("stages", []):
        lines += ["[[stages]]", *(f"{json.dumps(k)} = {toml(v)}" for k, v in stage.items())]
    return "\n".join(lines) + "\n"


def learn_stages(method: str) -> list[dict]:
    """Two tasks on the main data, both learned by ``method`` (the second runs its old-task terms:
    LwF's distillation of head a, EWC's penalty with task a's Fisher, PackNet's frozen weights)."""
    if method == "icarl":  # one stage, the task's classes in steps
        return [TRAIN, {"kind": "learn", "task": "a", "method": method, "epochs": 1, "class_steps": [[0], [1]]}]
    return [TRAIN, {"kind": "learn", "id": "learn-a", "task": "a", "method": method, "epochs": 1},
            {"kind": "learn", "id": "learn-b", "task": "b", "method": method, "epochs": 1}]


def grow_stages(op: str, task: str) -> list[dict]:
    grow = {"wider": {"wider": {HIDDEN[task]: 24}}, "deeper": {"deeper": [HIDDEN[task]]},
            "classes": {"classes": 12}}[op]
    return [TRAIN, {"kind": "grow", "noise": 0.0, **grow}]


def write_config(path: Path, stage: str, method: str, task: str) -> Path:
    config = dict(BASES[task])
    if stage == "learn":
        config["stages"] = learn_stages(method)
    elif stage == "grow":
        config["stages"] = grow_stages(method, task)
    else:
        config["stages"] = [TRAIN, {"kind": "export"}]
        config["search"] = {"strategy": method, "space": {"train.lr": [1e-3, 3e-3]}}
    path.write_text(toml_file(config))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # one stage cache: each task's train stage runs once


@pytest.mark.parametrize("stage, method, task", sorted(MATRIX), ids=lambda v: str(v))
def test_stage_for_task(tmp_path, cache, stage, method, task):
    expected = MATRIX[stage, method, task]
    config = write_config(tmp_path / "edgec.toml", stage, method, task)
    out = tmp_path / "out"
    env = {"EDGEC_CACHE_DIR": str(cache)}
    if expected != "builds":
        own_cache = tmp_path / "own-cache"  # a fresh cache: a refusal leaves no stage's output in it
        args = ["search", "--config", config, "--target", "rpi"] if stage == "search" else ["build", "--config", config]
        proc = run_cli(*args, "--out", out, cwd=tmp_path, env={"EDGEC_CACHE_DIR": str(own_cache)}, check=2)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert expected in lines[0] and (stage in lines[0] or stage == "search"), lines[0]
        assert not out.exists()
        ran = [p for p in own_cache.rglob("*") if p.is_file() and p.relative_to(own_cache).parts[0] != "source"]
        assert not ran, ran  # (the source model's initial weights are put there at plan time)
        return
    proc = run_cli("build", "--config", config, "--out", out, "--json", cwd=tmp_path, env=env)
    summary = json.loads(proc.stdout)
    info = summary["stages"][-1]["info"]
    figure = FIGURE[task]
    assert info["metric"] == figure and isinstance(info[figure], float), info
    if stage == "grow":
        assert info["task"] == task and info["function_preserved"]["passed"]
        assert info["function_preserved"]["max_abs_diff"] <= 1e-4 and "top1_agreement" not in info["function_preserved"]
        assert info[f"source_{figure}"] == pytest.approx(info[figure], abs=1e-4)  # the function is kept
    else:
        assert info["method"] == method and set(info["task_r2"]) == {"a", "b"} and "task_accuracy" not in info
        assert all(isinstance(v, float) for v in info["task_r2"].values())
        assert info["task_r2"]["b"] == pytest.approx(info[figure], abs=1e-6)
        report = run_cli("report", out / "rpi", cwd=tmp_path, env=env)  # build.json passes the report's checks
        assert "Traceback" not in report.stderr


def test_gaussian_fisher_of_a_linear_head_is_the_input_second_moment():
    """EWC's Fisher for regression heads: with f = W x + b and unit-variance Gaussian outputs,
    F(W_kj) = E[x_j^2] and F(b_k) = 1, for every output k."""
    from edgec.pipeline.algorithms.continual import diagonal_fisher

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(40, 3)
    fisher = diagonal_fisher(model, x, (0, 2), ["weight", "bias"], likelihood="gaussian")
    assert torch.allclose(fisher["weight"], x.pow(2).mean(0).expand(2, 3), atol=1e-6)
    assert torch.allclose(fisher["bias"], torch.ones(2), atol=1e-6)


def test_lwf_temperature_is_refused_for_regression(tmp_path):
    """Regression heads output values, which lwf keeps by MSE: a temperature would be a silent no-op."""
    config = write_config(tmp_path / "edgec.toml", "learn", "lwf", "regression")
    config.write_text(config.read_text() + '"temperature" = 3.0\n')  # on the last stage, learn-b
    proc = run_cli("build", "--config", config, "--out", tmp_path / "out", cwd=tmp_path,
                   env={"EDGEC_CACHE_DIR": str(tmp_path / "cache")}, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "temperature" in lines[0] and "regression" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
