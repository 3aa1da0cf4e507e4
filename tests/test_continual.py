"""Continual learning: the learn stage (finetune, features, joint, lwf, ewc, packnet), task heads,
multi-task bundles (one model, or PackNet's model per task with one transport payload), the
on-device task interface (predict/verify/bench --task) and the example config.

Tiny data (scikit-learn digits), tiny MLPs, one torch thread, fixed seeds: every figure here is
deterministic."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from edgec.base.architecture import ModelTrust
from edgec.base.data import load_dataset
from edgec.data_views import permute_features, select_classes
from edgec.base.errors import ConfigError
from edgec.modules import ConcatHeads
from edgec.pipeline.algorithms import continual as cl
from edgec.pipeline.cache import StageCache
from edgec.pipeline.runner import check_chain, run_chain
from edgec.pipeline.source import make_source
from edgec.pipeline.stage import StageContext
from edgec.pipeline.stages.export import ExportConfig, ExportStage
from edgec.pipeline.stages.learn import LearnConfig, LearnStage
from edgec.targets.profile import load_target
from support import run_cli

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def permuted(digits):
    """Two tasks on the same digits, each with its own fixed pixel permutation (Permuted-digits)."""
    return {"main": digits, "a": permute_features(digits, 1), "b": permute_features(digits, 2)}


def split(digits):
    return {"main": digits, "a": select_classes(digits, [0, 1, 2, 3, 4], "a"),
            "b": select_classes(digits, [5, 6, 7, 8, 9], "b")}


def chain(tmp_path, datasets, stages, target=None, widths=(32,)):
    tasks = {name: name for name in datasets if name != "main"}
    ctx = StageContext(data=datasets["main"], seed=0, target=load_target(target) if target else None,
                       console=Console(quiet=True), datasets=datasets, tasks=tasks)
    cache = StageCache(tmp_path / "cache")
    first = datasets.get(tasks.get(stages[0].config.task), datasets["main"]) if isinstance(stages[0], LearnStage) else datasets["main"]
    source = make_source("mlp", {"widths": list(widths)}, None, first, 0, cache, ModelTrust())
    check_chain(stages, source, ctx, datasets)
    return run_chain(stages, source, ctx, cache, datasets=datasets)


def learn(task, method, stage_id=None, **keys):
    keys.setdefault("epochs", 25)
    keys.setdefault("patience", max(keys["epochs"], 1))
    keys.setdefault("lr", 3e-3)
    return LearnStage(LearnConfig(task=task, method=method, **keys), stage_id or f"learn-{task}")


# --- algorithms -----------------------------------------------------------------------------------------


def test_new_head_keeps_old_columns_exactly(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    x = torch.from_numpy(digits.to_input(digits.x_test[:32]))
    before = model(x).detach()
    path = cl.add_task_head(model, x, "a", 10, seed=0)
    assert path == "3" and isinstance(model[3], ConcatHeads)
    model[3]["a"].load_state_dict(nn.Linear(16, 10).state_dict())  # any head: columns follow the head
    a_out = model(x).detach()
    cl.add_task_head(model, x, "task-b", 3, seed=1)
    out = model(x).detach()
    assert out.shape == (32, 13) and torch.equal(out[:, :10], a_out)
    assert cl.head_columns(model, path) == {"a": (0, 10), "task_b": (10, 13)}
    assert not torch.equal(before, a_out)


def test_output_layer_must_be_a_linear(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))
    with pytest.raises(ConfigError, match="output layer"):
        cl.find_output_layer(model, torch.zeros(2, 1, 8, 8))


def test_fisher_matches_per_sample_loop():
    """The vmap'd Fisher equals E_x sum_y p(y|x) (d log p(y|x) / d theta)^2 computed one sample and
    one class at a time with autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 6))
    x = torch.randn(7, 5)
    names = ["0.weight", "0.bias"]
    fast = cl.diagonal_fisher(model, x, (2, 5), names, chunk=3)
    slow = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    params = dict(model.named_parameters())
    for xi in x:
        logp = torch.log_softmax(model(xi[None])[0, 2:5], 0)
        for c in range(3):
            model.zero_grad()
            logp[c].backward(retain_graph=True)
            for n in names:
                slow[n] += logp[c].exp().item() * params[n].grad ** 2
    for n in names:
        torch.testing.assert_close(fast[n], slow[n] / len(x), rtol=1e-5, atol=1e-7)


def test_ewc_penalty_and_lwf_loss():
    theta = {"w": torch.tensor([1.0, 2.0])}
    pairs = [({"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([0.0, 0.0])})]
    assert cl.ewc_penalty(theta, pairs, 2.0).item() == pytest.approx(0.5 * 2.0 * (1 * 1 + 3 * 4))
    out = torch.randn(4, 6)
    assert cl.lwf_loss(out, out.clone(), {"a": (0, 3)}, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert cl.lwf_loss(out, torch.randn(4, 6), {"a": (0, 3), "b": (3, 6)}, 2.0).item() > 0


def test_packnet_prune_frees_the_smallest_of_the_task_weights():
    w = torch.arange(1, 11, dtype=torch.float32).reshape(2, 5)
    owner = {"w": torch.zeros(2, 5, dtype=torch.uint8)}
    owner["w"][0, 4] = 1  # already task 1's
    new = cl.packnet_prune({"w": w}, owner, 2, 0.5)
    # 9 free weights, round(4.5) = 4 (banker's) or 5 freed: the smallest ones, task 1's kept
    freed = (new["w"] == 0)
    assert int(freed.sum()) == round(0.5 * 9)
    assert new["w"][0, 4] == 1 and torch.all(w[freed] == 0)
    assert torch.all(w[new["w"] == 2] > w[freed].abs().max())


def test_task_models_transport_roundtrip():
    from edgec.ondevice.tasks import decode_task_models

    rng = np.random.default_rng(0)
    base = rng.integers(-127, 128, 4000).astype(np.int8)
    level = rng.integers(1, 4, 4000)
    files = {}
    for k in (1, 2):
        f = np.where(level <= k, base, 0).astype(np.int8).view(np.uint8).copy()
        f[:8] = rng.integers(0, 256, 8)  # a header that differs: the residual carries it
        files[f"model.t{k}.tflite"] = f.tobytes()
    files["odd.bin"] = b"different length"
    payload = cl.encode_task_models(base.tobytes(), "model.tflite", files)
    assert decode_task_models(payload, base.tobytes()) == files
    with pytest.raises(ValueError):
        decode_task_models(payload, base[::-1].tobytes())


# --- plan-time checks -------------------------------------------------------------------------------------


def test_plan_refuses_unknown_task_and_methods_that_need_what_is_missing(tmp_path, digits):
    data = split(digits)
    with pytest.raises(ConfigError, match="not declared"):
        chain(tmp_path, data, [learn("nope", "finetune")])
    # joint needs the old task's data: a build that does not load it fails in the plan, not after training
    ctx_data = {"main": digits, "b": data["b"]}
    ctx = StageContext(data=digits, seed=0, target=None, console=Console(quiet=True), datasets=ctx_data,
                       tasks={"b": "b"})
    cache = StageCache(tmp_path / "c2")
    first = run_chain([learn("a", "finetune", data="a", epochs=1)], make_source("mlp", {"widths": [8]}, None, data["a"], 0,
                      cache, ModelTrust()), StageContext(data=digits, seed=0, target=None, console=Console(quiet=True),
                                                         datasets=data, tasks={"a": "a"}), cache, datasets=data)[-1]
    with pytest.raises(ConfigError, match="needs the data of task 'a'"):
        check_chain([learn("b", "joint")], first.artifact, ctx, ctx_data)
    with pytest.raises(ConfigError, match="packnet"):
        check_chain([learn("b", "packnet")], first.artifact, ctx, ctx_data)
    with pytest.raises(ConfigError, match="ewc needs its Fisher"):
        check_chain([learn("b", "ewc")], first.artifact, ctx, ctx_data)
    with pytest.raises(ConfigError, match="export: task 'a'"):
        check_chain([learn("b", "lwf"), ExportStage(ExportConfig())], first.artifact,
                    dataclasses_replace(ctx, target=load_target("rpi")), ctx_data)


def dataclasses_replace(ctx, **kw):
    import dataclasses

    return dataclasses.replace(ctx, **kw)


def test_method_keys_belong_to_their_method():
    with pytest.raises(ValueError, match="temperature applies to method = \"lwf\""):
        LearnConfig(task="a", method="ewc", temperature=3.0)
    with pytest.raises(ValueError, match="needs training"):
        LearnConfig(task="a", method="finetune", epochs=0)
    LearnConfig(task="a", method="ewc", ewc_lambda=10.0, ewc_mode="online", ewc_decay=0.9)


# --- forgetting happens with finetune and is reduced by ewc, lwf and packnet --------------------------------


def forgetting(tmp_path, datasets, method, **keys):
    keys = {"epochs": 40, "lr": 1e-2, **keys}  # long enough at a high rate that finetune clearly forgets
    steps = chain(tmp_path / method, datasets, [learn("a", method, **keys), learn("b", method, **keys)])
    first, second = steps[0].artifact.info["task_accuracy"], steps[1].artifact.info["task_accuracy"]
    return first["a"], second["a"], second["b"]


@pytest.fixture(scope="module")
def permuted_results(tmp_path_factory, digits):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("forgetting")
    data = permuted(digits)
    return {
        "finetune": forgetting(tmp, data, "finetune"),
        "ewc": forgetting(tmp, data, "ewc", ewc_lambda=2000.0),
        "lwf": forgetting(tmp, data, "lwf", lambda_old=4.0),
        "packnet": forgetting(tmp, data, "packnet", prune=0.6, retrain_epochs=5),
        "features": forgetting(tmp, data, "features"),
        "joint": forgetting(tmp, data, "joint"),
    }


def test_finetune_forgets(permuted_results):
    a_before, a_after, b = permuted_results["finetune"]
    assert a_before > 0.85 and b > 0.85
    assert a_before - a_after > 0.15, permuted_results["finetune"]


@pytest.mark.parametrize("method", ["ewc", "lwf", "packnet"])
def test_ewc_lwf_packnet_forget_less(permuted_results, method):
    ft_before, ft_after, _ = permuted_results["finetune"]
    before, after, b = permuted_results[method]
    assert before - after < 0.5 * (ft_before - ft_after), (method, permuted_results)
    assert b > 0.7, (method, permuted_results)  # and still learn the new task


def test_packnet_and_features_do_not_forget_at_all(permuted_results):
    for method in ("packnet", "features"):
        before, after, _ = permuted_results[method]
        assert before == after, (method, permuted_results[method])


def test_joint_learns_both(permuted_results):
    _, a, b = permuted_results["joint"]
    assert a > 0.85 and b > 0.85


def test_finetune_freeze_and_backbone_lr(tmp_path, digits):
    data = split(digits)
    steps = chain(tmp_path, data, [learn("a", "finetune"), learn("b", "finetune", freeze=["hidden.0"], stage_id="frozen"),
                                   learn("b", "finetune", backbone_lr=0.1, stage_id="slow")])
    ckpts = [s.artifact.checkpoint() for s in steps]
    w = "hidden.0.weight"
    assert torch.equal(ckpts[0].state_dict[w], ckpts[1].state_dict[w])  # frozen
    assert not torch.equal(ckpts[1].state_dict[w], ckpts[2].state_dict[w])
    # the old head is never touched by finetune
    assert torch.equal(ckpts[0].state_dict["out.a.weight"], ckpts[2].state_dict["out.a.weight"])
    assert steps[-1].artifact.info["columns"] == {"a": [0, 5], "b": [5, 10]}


def test_ewc_online_keeps_one_running_fisher(tmp_path, digits):
    data = {**split(digits), "c": select_classes(digits, [0, 9], "c")}
    keys = dict(method="ewc", ewc_mode="online", ewc_decay=0.5, ewc_lambda=100.0, epochs=3)
    steps = chain(tmp_path, data, [learn("a", **keys), learn("b", **keys), learn("c", **keys)])
    ewc = steps[-1].artifact.checkpoint().extensions["ewc"]
    assert ewc["mode"] == "online" and ewc["online"] is not None
    assert set(ewc["tasks"]) == {"a", "b", "c"} and all(v == {} for v in ewc["tasks"].values())
    assert set(ewc["online"]["fisher"]) == {"hidden.0.weight", "hidden.0.bias"}


def test_head_keep_adopts_a_trained_output_layer(tmp_path, digits):
    """A model trained for task a without learn stages (a plain train stage, or --weights) keeps its
    output layer as task a's head: epochs = 0 changes nothing, and task b is added beside it."""
    from edgec.pipeline.stages.train import TrainConfig, TrainStage

    data = split(digits)
    ctx = StageContext(data=data["a"], seed=0, target=None, console=Console(quiet=True), datasets=data,
                       tasks={"a": "a", "b": "b"})
    cache = StageCache(tmp_path / "cache")
    source = make_source("mlp", {"widths": [32]}, None, data["a"], 0, cache, ModelTrust())
    trained = run_chain([TrainStage(TrainConfig(epochs=20, lr=3e-3))], source, ctx, cache)[-1]
    stages = [learn("a", "ewc", head="keep", epochs=0), learn("b", "ewc", ewc_lambda=100.0)]
    check_chain(stages, trained.artifact, ctx, data)
    steps = run_chain(stages, trained.artifact, ctx, cache, datasets=data)
    assert steps[0].artifact.info["task_accuracy"]["a"] == trained.artifact.info["accuracy"]
    assert "a" in steps[0].artifact.checkpoint().extensions["ewc"]["tasks"]  # its Fisher, for task b's penalty
    assert set(steps[1].artifact.info["task_accuracy"]) == {"a", "b"}
    with pytest.raises(ConfigError, match="first learn stage"):
        check_chain([learn("c", "finetune", head="keep", epochs=0, data="b")], steps[1].artifact,
                    dataclasses_replace(ctx, tasks={}), data)


# --- multi-task bundles ----------------------------------------------------------------------------------


def verify(bundle: Path, *args, check=0):
    proc = run_cli("verify", bundle, "--json", "-", *args, cwd=bundle.parent, check=check)
    return json.loads(proc.stdout)


def publish(step, dest: Path) -> Path:
    """The export stage's cache entry as a bundle folder (what the build publishes)."""
    shutil.copytree(step.artifact.path, dest, ignore=shutil.ignore_patterns("entry.json"))
    return dest


@pytest.fixture(scope="module")
def split_bundles(tmp_path_factory, digits):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("bundles")
    data = split(digits)
    out = {}
    for target in ("rpi", "desktop-gpu"):
        steps = chain(tmp / target, data, [learn("a", "finetune"), learn("b", "lwf"), ExportStage(ExportConfig())],
                      target=target)
        out[target] = publish(steps[-1], tmp / f"{target}-bundle")
    steps = chain(tmp / "packnet", data, [learn("a", "packnet", prune=0.5, retrain_epochs=3),
                                         learn("b", "packnet", prune=0.0), ExportStage(ExportConfig())], target="rpi")
    out["packnet"] = publish(steps[-1], tmp / "packnet-bundle")
    out["data"] = data
    return out


@pytest.mark.parametrize("target", ["rpi", "desktop-gpu"])
def test_one_model_multitask_bundle_verifies(split_bundles, target):
    bundle = split_bundles[target]
    manifest = json.loads((bundle / "manifest.json").read_text())
    tasks = {t["name"]: t for t in manifest["tasks"]}
    assert [t["columns"] for t in manifest["tasks"]] == [[0, 5], [5, 10]]
    assert tasks["b"]["labels"] == ["5", "6", "7", "8", "9"] and tasks["a"]["method"] == "finetune"
    assert all(t["model_file"] == manifest["model_file"] for t in manifest["tasks"])  # one model, every head
    assert manifest["outputs"][0]["shape"][-1] == 10
    for t in manifest["tasks"]:
        assert t["metrics"]["accuracy"] > 0.85 and t["metrics"]["top1_agreement"] >= 0.99
    report = verify(bundle)
    assert report["ok"], report["errors"]
    names = {c["name"] for c in report["checks"]}
    assert {"task a: accuracy", "task b: accuracy"} <= names
    assert set(report["tasks"]) == {"a", "b"}


def test_predict_and_bench_per_task(split_bundles, tmp_path):
    bundle, data = split_bundles["rpi"], split_bundles["data"]
    samples = tmp_path / "x.npy"
    np.save(samples, data["b"].x_test[:20])
    import subprocess
    import sys

    def run(*args):  # the bundle's own runner: python run.py ...
        return subprocess.run([sys.executable, str(bundle / "run.py"), *args], capture_output=True, text=True,
                              cwd=tmp_path)

    done = run("predict", str(samples), "--task", "b", "--json", "-")
    assert done.returncode == 0, done.stderr
    preds = json.loads(done.stdout)["predictions"]
    assert [p["label"] for p in preds] == [str(5 + int(c)) for c in (p["class"] for p in preds)]
    accuracy = np.mean([p["class"] == y for p, y in zip(preds, data["b"].y_test[:20])])
    assert accuracy >= 0.8
    missing = run("predict", str(samples))
    assert missing.returncode == 2 and "--task" in missing.stderr and "a, b" in missing.stderr
    unknown = run("predict", str(samples), "--task", "zzz")
    assert unknown.returncode == 2 and "no such task" in unknown.stderr
    one = run("verify", "--task", "a", "--json", "-")
    assert one.returncode == 0, one.stderr
    assert set(json.loads(one.stdout)["tasks"]) == {"a"}
    bench = run("bench", "--task", "b", "--no-sweep", "--runs", "5", "--min-seconds", "0", "--warmup", "1",
                "--warmup-seconds", "0", "--batch-sizes", "1", "--in-process", "--no-write-recommended", "--json", "-")
    assert bench.returncode == 0, bench.stderr
    result = json.loads(bench.stdout)
    assert set(result["tasks"]) == {"b"} and result["accuracy"]["accuracy"] >= 0.8


def test_packnet_bundle_ships_a_model_per_task_in_about_one_models_bytes(split_bundles):
    bundle = split_bundles["packnet"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    tasks = {t["name"]: t for t in manifest["tasks"]}
    assert tasks["a"]["model_file"] == "model.a.tflite" and tasks["b"]["model_file"] == "model.tflite"
    tt = manifest["tasks_transport"]
    assert tt["file"] == "model.tasks.edgt" and tt["model_files"] == ["model.a.tflite"]
    # the second model costs a fraction of a model file, not another model
    assert tt["bytes"] < (tt["models_bytes"] / 2) / 3 and tt["total_bytes"] == manifest["size"]["transport_bytes"] + tt["bytes"]
    report = verify(bundle)
    assert report["ok"], report["errors"]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["tasks transport"]["ok"] and checks["task a: test_vectors"]["ok"]
    # a damaged tasks payload is caught (the file table is rewritten so only the decode can fail)
    broken = bundle.parent / "packnet-broken"
    shutil.copytree(bundle, broken)
    payload = bytearray((broken / "model.tasks.edgt").read_bytes())
    payload[-3] ^= 0xFF
    (broken / "model.tasks.edgt").write_bytes(bytes(payload))
    from edgec.pipeline.manifest import write_manifest

    m = json.loads((broken / "manifest.json").read_text())
    write_manifest(broken, m)
    report = verify(broken, check=1)
    assert not report["ok"] and any("tasks transport" in e for e in report["errors"])


def test_export_gates_every_task(tmp_path, digits):
    """A task the exported model gets wrong is refused even when the other task passes."""
    data = split(digits)
    strict = load_target("rpi").model_copy(deep=True)
    strict.budgets.min_agreement = 1.01  # unreachable: every task must be named
    ctx = StageContext(data=digits, seed=0, target=strict, console=Console(quiet=True), datasets=data,
                       tasks={"a": "a", "b": "b"})
    cache = StageCache(tmp_path / "cache")
    source = make_source("mlp", {"widths": [16]}, None, data["a"], 0, cache, ModelTrust())
    from edgec.base.errors import RunError

    with pytest.raises(RunError, match="task 'a'.*task 'b'"):
        run_chain([learn("a", "finetune", epochs=3), learn("b", "lwf", epochs=3), ExportStage(ExportConfig())], source,
                  ctx, cache, datasets=data)


@pytest.mark.skipif(os.environ.get("EDGEC_SKIP_EMULATION") == "1" or shutil.which("qemu-aarch64-static") is None,
                    reason="needs qemu-aarch64-static (EDGEC_SKIP_EMULATION=1 skips)")
@pytest.mark.parametrize("which", ["rpi", "packnet"])
def test_multitask_bundle_verifies_on_emulated_arm64(split_bundles, which):
    bundle = split_bundles[which]
    report = json.loads(run_cli("verify", bundle, "--emulate", "arm64", "--json", "-", cwd=bundle.parent).stdout)
    runs = {run["emulation"]["runtime"]: run for run in report["runs"]}
    assert set(runs) == {"ai-edge-litert", "tflite-runtime"}
    for run in runs.values():
        assert run["ok"], run.get("errors")
        assert {"task a: accuracy", "task b: accuracy"} <= {c["name"] for c in run["checks"]}


# --- the example ------------------------------------------------------------------------------------------


def test_add_a_task_example_builds_a_two_task_rpi_bundle(tmp_path):
    run_cli("build", "--config", ROOT / "examples" / "add-a-task.toml", "--target", "rpi", "--out", tmp_path / "out",
            cwd=tmp_path)
    build = json.loads((tmp_path / "out" / "rpi" / "build.json").read_text())
    learns = [s for s in build["stages"] if s["kind"] == "learn"]
    assert [s["info"]["task"] for s in learns] == ["low", "high"]
    assert set(learns[-1]["info"]["task_accuracy"]) == {"low", "high"}
    bundle = tmp_path / "out" / "rpi" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["low", "high"]
    assert verify(bundle)["ok"]
    report = (tmp_path / "out" / "rpi" / "report.md").read_text()
    assert "Forgetting" in report


def test_transfer_from_user_weights_trains_a_new_head_only(tmp_path):
    """--weights of a user model (BatchNorm, residual) + method = "features": the pretrained classifier
    is replaced by a head for the new label set; the backbone, BatchNorm statistics included, ships as
    it was trained."""
    from edgec.api import build

    user = {"name": "fixtures.user_models:make", "args": {"channels": 8}}
    pre = build({"model": user, "stages": [{"kind": "train", "epochs": 15, "lr": 5e-3}]}, target="rpi",
                out=tmp_path / "pre", cache_dir=tmp_path / "cache")
    weights = pre.build_dir / "model.pt"
    config = {"model": {**user, "weights": str(weights)},
              "data": {"source": "digits", "high": {"classes": [5, 6, 7, 8, 9]}},
              "tasks": [{"name": "high", "data": "high"}],
              "stages": [{"kind": "learn", "task": "high", "method": "features", "epochs": 20, "lr": 1e-2},
                         {"kind": "export"}]}
    result = build(config, target="rpi", out=tmp_path / "transfer", cache_dir=tmp_path / "cache")
    before = torch.load(weights, weights_only=True)["state_dict"]
    after = torch.load(result.build_dir / "reference.pt", weights_only=True)["state_dict"]
    for name, tensor in before.items():
        if not name.startswith("head."):
            assert torch.equal(tensor, after[name]), name  # backbone and BatchNorm statistics untouched
    assert set(after) - set(before) == {"head.high.weight", "head.high.bias"}
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["high"] and manifest["tasks"][0]["labels"] == list("56789")
    assert manifest["tasks"][0]["metrics"]["accuracy"] > 0.8
