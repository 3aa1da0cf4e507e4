"""Structured channel pruning (prune.mode = "channels") and the speedup gate (min_speedup)."""

import json

import pytest
import torch
from rich.console import Console
from torch import nn

from edgec.base import architecture
from edgec.base.architecture import ModelTrust
from edgec.budgets import check_budgets
from edgec.base.checkpoint import Checkpoint
from edgec.base.data import load_dataset
from edgec.base.errors import ConfigError
from edgec.pipeline.algorithms.channels import (
    ChannelPruner, ChannelSpec, accumulate_gradients, channel_widths, model_cost, output_layers, prune_channels,
)
from edgec.pipeline.algorithms.pruning import LayerSparsity, compute_masks
from edgec.pipeline.artifact import MODEL
from edgec.pipeline.cache import StageCache
from edgec.pipeline.runner import check_chain, run_chain
from edgec.pipeline.stage import Probe, StageContext
from edgec.pipeline.stages.prune import PruneConfig, PruneStage
from edgec.pipeline.stages.retrain import RetrainConfig, RetrainStage
from edgec.pipeline.stages.train import TrainConfig, TrainStage
from edgec.targets.profile import Budgets
from fixtures import edge_models
from support import zoo_source

X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
BLOCKS = ["inverted_residual", "mobilenet_v3_block", "squeezenet_fire", "resnet_basic", "efficientnet_mbconv",
          "local_block_class"]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(edge_models, name)(input_shape=(1, 16, 16), num_classes=10).eval()


@pytest.mark.parametrize("name", BLOCKS)
def test_channels_are_removed_for_real_and_the_record_rebuilds_the_model(name):
    """Residual adds, depthwise convs, squeeze-excite, concatenations: the pruned model is smaller, still
    runs, keeps its classes, and the architecture record rebuilds exactly it."""
    model = _model(name)
    before, cost = channel_widths(model), model_cost(model, X)
    ChannelPruner(model, X, ChannelSpec(0.5)).step()
    after = model_cost(model, X)
    assert model.eval()(X).shape == (2, 10)
    assert after["macs"] < 0.6 * cost["macs"] and after["params"] < cost["params"]
    assert any(channel_widths(model)[n] < w for n, w in before.items())
    factory = f"fixtures.edge_models:{name}"
    trust = ModelTrust(frozenset({factory}))
    base = architecture.factory_base(factory, input_shape=[1, 16, 16], num_classes=10)
    arch = architecture.record(base, architecture.diff_edits(architecture.build(architecture.record(base), trust), model))
    rebuilt = Checkpoint(arch, model.state_dict()).build(trust)
    assert torch.allclose(rebuilt(X), model(X), atol=1e-6)


def test_round_to_keeps_simd_friendly_widths():
    model = _model("resnet_basic")  # stem 8 channels (coupled to layer1 by the identity add), layer2 16
    ChannelPruner(model, X, ChannelSpec(0.3, round_to=4)).step()
    widths = channel_widths(model)
    assert widths["stem.0"] == 4 and widths["layer2.conv1"] == 8 and widths["layer2.conv2"] == 8
    assert all(w % 4 == 0 for n, w in widths.items() if n != "fc")
    narrow = _model("resnet_basic")  # a layer narrower than round_to keeps its channels instead of vanishing
    ChannelPruner(narrow, X, ChannelSpec(0.5, round_to=16)).step()
    assert channel_widths(narrow)["stem.0"] == 8 and channel_widths(narrow)["layer2.conv1"] == 16


def test_masks_are_sliced_exactly_with_their_weights():
    model = _model("resnet_basic")
    masks = compute_masks(model, LayerSparsity({"conv": 0.6, "fc": 0.5}))
    with torch.no_grad():  # every weight a distinct value: the pruned weights tell where they came from
        for name, p in model.named_parameters():
            if name in masks:
                p.copy_(torch.arange(1, p.numel() + 1, dtype=p.dtype).view_as(p) + 1000 * len(name))
    original = {n: (p.detach().clone(), masks[n]) for n, p in model.named_parameters() if n in masks}
    pruner = ChannelPruner(model, X, ChannelSpec(0.5), masks=masks)
    pruner.step()
    params = dict(model.named_parameters())
    assert set(pruner.masks) == set(masks)
    for name, mask in pruner.masks.items():
        w, (w0, m0) = params[name].detach(), original[name]
        assert mask.shape == w.shape and mask.dtype == torch.bool
        lookup = dict(zip(w0.flatten().tolist(), m0.flatten().tolist()))
        assert mask.flatten().tolist() == [lookup[v] for v in w.flatten().tolist()], name
    assert channel_widths(model)["layer2.conv1"] == 8


def test_per_layer_ratios_and_their_errors():
    model = _model("resnet_basic")
    ChannelPruner(model, X, ChannelSpec({"layer2.conv1": 0.5})).step()
    widths = channel_widths(model)
    assert widths["layer2.conv1"] == 8 and widths["layer2.conv2"] == 16 and widths["stem.0"] == 8
    for ratio, message in [
        ({"nope": 0.5}, "no prunable layer named 'nope'"),
        ({"fc": 0.5}, "'fc' is an output layer"),
        ({"layer2.conv2": 0.5, "layer2.shortcut.0": 0.25}, "coupled"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ChannelPruner(_model("resnet_basic"), X, ChannelSpec(ratio))
    with pytest.raises(ConfigError, match="one ratio"):
        ChannelSpec({"conv": 0.5}, global_ranking=True)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        ChannelSpec(1.0)
    with pytest.raises(ConfigError, match="no BatchNorm"):
        ChannelPruner(_model("squeezenet_fire"), X, ChannelSpec(0.5, importance="bn"))


def test_global_ranking_and_iterative_steps():
    model = _model("inverted_residual")
    total = sum(w for n, w in channel_widths(model).items())
    ChannelPruner(model, X, ChannelSpec(0.5, global_ranking=True, max_ratio=0.8)).step()
    assert model(X).shape == (2, 10) and sum(channel_widths(model).values()) < total
    one_shot, iterative = _model("resnet_basic"), _model("resnet_basic")
    ChannelPruner(one_shot, X, ChannelSpec(0.5)).step()
    pruner = ChannelPruner(iterative, X, ChannelSpec(0.5), steps=3, schedule="cubic")
    widths = []
    for _ in range(3):
        pruner.step()
        widths.append(channel_widths(iterative)["layer2.conv1"])
    assert widths[0] > widths[1] >= widths[2] == channel_widths(one_shot)["layer2.conv1"] == 8
    with pytest.raises(ConfigError, match="only 3 step"):
        pruner.step()


def test_taylor_importance_uses_loss_gradients():
    model = _model("resnet_basic")
    accumulate_gradients(model, [(X, torch.tensor([1, 2]))], lambda out, x, y: nn.functional.cross_entropy(out, y))
    assert model.stem[0].weight.grad is not None
    ChannelPruner(model, X, ChannelSpec(0.5, importance="taylor")).step()
    assert channel_widths(model)["layer2.conv1"] == 8 and all(p.grad is None for p in model.parameters())


def test_output_layers_and_the_distill_helper():
    model = _model("squeezenet_fire")  # the classifier is a 1x1 conv inside a Sequential
    assert output_layers(model, X) == [model.final_conv]
    student = prune_channels(model, X, 0.5)
    assert student(X).shape == (2, 10) and channel_widths(model) != channel_widths(student)


# --- the stage --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """cnn-small on the digits, trained a few epochs (seconds)."""
    data = load_dataset("digits")
    cache = StageCache(tmp_path_factory.mktemp("cache"))
    source = zoo_source(cache, "cnn-small", data, channels=[16, 32])
    ctx = StageContext(data=data, seed=0, target=None, console=Console(quiet=True))
    (step,) = run_chain([TrainStage(TrainConfig(epochs=8, patience=8))], source, ctx, cache)
    return step.artifact, ctx, cache


def _probe(artifact, ctx):
    ckpt = artifact.checkpoint()
    return Probe(kind=MODEL, model=ckpt.build(ctx.trust), arch=ckpt.arch, data=ctx.data, target=None, trust=ctx.trust)


def test_check_returns_the_pruned_model_at_plan_time(trained):
    artifact, ctx, _ = trained
    probe = PruneStage(PruneConfig(mode="channels", ratio=0.5, round_to=8)).check(_probe(artifact, ctx))
    assert channel_widths(probe.model) == {"features.0.0": 8, "features.1.0": 16, "fc": 10}
    assert probe.arch["edits"] and architecture.build(probe.arch, ctx.trust).features[1][0].out_channels == 16


@pytest.mark.parametrize("keys, message", [
    ({"ratio": {"features.9": 0.5}}, "no prunable layer named 'features.9'"),
    ({"ratio": {"fc": 0.5}}, "output layer"),
    ({"ratio": {"conv": 0.5}, "scope": "global"}, "takes one number"),
    ({"ratio": 0.1, "round_to": 64}, "would remove no channel"),
])
def test_bad_channel_settings_fail_at_plan_time(trained, keys, message):
    artifact, ctx, _ = trained
    stages = [RetrainStage(RetrainConfig(epochs=1)), PruneStage(PruneConfig(mode="channels", **keys))]
    with pytest.raises(ConfigError, match=message) as e:
        check_chain(stages, artifact, ctx)
    assert e.value.exit_code == 2 and "stage 'prune'" in str(e.value)


def test_ratio_is_validated_by_the_config():
    with pytest.raises(Exception, match=r"ratio must be in \[0, 1\)"):
        PruneConfig(mode="channels", ratio=1.2)


def test_stage_prunes_channels_keeps_masks_and_later_stages_see_the_new_shapes(trained):
    artifact, ctx, cache = trained
    steps = run_chain([
        PruneStage(PruneConfig(mode="layer", sparsity={"conv": 0.5, "linear": 0.5}, steps=1)),
        PruneStage(PruneConfig(mode="channels", ratio=0.5, steps=2, retrain={"epochs": 1}), id="prune-channels"),
        RetrainStage(RetrainConfig(epochs=2)),
    ], artifact, ctx, cache)
    info = steps[1].artifact.info
    assert info["channels"]["layers"]["features.1.0"] == [32, 16] and info["channels"]["macs_removed"] > 0.5
    assert info["params"] < steps[0].artifact.info["params"] / 2
    ckpt = steps[2].artifact.checkpoint()
    model = ckpt.build(ctx.trust)
    assert model.features[0][0].out_channels == 8 and model.fc.in_features == 16 * 2 * 2
    assert set(ckpt.masks) == {"features.0.0.weight", "features.1.0.weight", "fc.weight"}
    for name, p in model.named_parameters():  # the sliced masks are still enforced by retrain
        if name in ckpt.masks:
            assert ckpt.masks[name].shape == p.shape and not p[~ckpt.masks[name]].any()
    assert info["accuracy"] > 0.5 and steps[2].artifact.info["accuracy"] > 0.8


def test_channels_refuses_per_weight_learn_state(trained):
    artifact, ctx, _ = trained
    probe = _probe(artifact, ctx).evolve(extensions={"ewc": {"mode": "separate"}})
    with pytest.raises(ConfigError, match="per-weight state"):
        PruneStage(PruneConfig(mode="channels")).check(probe)


# --- the speedup gate -----------------------------------------------------------------------------


def _bench(speedup):
    return {"schema": "edgec-bench", "schema_version": 1, "latency_ms": {"p50": 1.0, "p95": 1.2},
            "baseline": {"speedup_p50": speedup, "p50_ms": speedup, "bundle_p50_ms": 1.0}}


def test_min_speedup_budget():
    manifest = {"metrics": {"reference_accuracy": 0.9, "accuracy": 0.9, "top1_agreement": 1.0}, "size": {}}
    rows = {r["budget"]: r for r in check_budgets(manifest, Budgets(min_speedup=2.0), _bench(2.5))}
    assert rows["min_speedup"]["ok"] and rows["min_speedup"]["p50_ms"] == {"bundle": 1.0, "uncompressed": 2.5}
    rows = {r["budget"]: r for r in check_budgets(manifest, Budgets(min_speedup=2.0), _bench(1.1))}
    assert rows["min_speedup"]["ok"] is False
    no_baseline = {k: v for k, v in _bench(1.0).items() if k != "baseline"}
    rows = {r["budget"]: r for r in check_budgets(manifest, Budgets(min_speedup=2.0), no_baseline)}
    assert rows["min_speedup"]["ok"] is None
    assert "min_speedup" not in {r["budget"] for r in check_budgets(manifest, Budgets(), _bench(1.0))}
    with pytest.raises(Exception):
        Budgets(min_speedup=0)


def test_min_speedup_judges_the_lower_bound_of_interleaved_rounds():
    """A median above the limit does not pass when the conservative bound is below it."""
    from edgec.ondevice.paired import summarize_ratios

    manifest = {"metrics": {"reference_accuracy": 0.9, "accuracy": 0.9, "top1_agreement": 1.0}, "size": {}}
    bench = _bench(2.4)
    bench["baseline"]["speedup"] = summarize_ratios([1.7, 1.9, 2.1, 2.2, 2.3, 2.4, 2.4, 2.5, 2.6])
    row = {r["budget"]: r for r in check_budgets(manifest, Budgets(min_speedup=2.0), bench)}["min_speedup"]
    assert row["actual"] == 1.9 and row["ok"] is False and "lower bound" in row["rule"]
    assert {r["budget"]: r for r in check_budgets(manifest, Budgets(min_speedup=1.8), bench)}["min_speedup"]["ok"]


def test_build_keeps_the_uncompressed_model_and_bench_baseline_gates_the_speedup(tmp_path):
    """End to end: a channel-pruned rpi bundle; `edgec bench --baseline` exports uncompressed.pt for the same
    target and times both in one run; `edgec check --min-speedup` passes or fails on the measured ratio and
    shows both latencies; the report shows them too."""
    from edgec.api import build
    from edgec.report import write_report
    from support import run_cli

    result = build({"model": {"name": "cnn-small"}, "budget": {"enforce": False}, "stages": [  # speed, not accuracy
        {"kind": "train", "epochs": 2},
        {"kind": "prune", "mode": "channels", "ratio": 0.5, "steps": 1},
        {"kind": "export", "eval_samples": 50},
    ]}, target="rpi", out=tmp_path / "out", cache_dir=tmp_path / "cache")
    build_dir = result.build_dir
    uncompressed = torch.load(build_dir / "uncompressed.pt", weights_only=True)
    assert uncompressed["arch"]["edits"] == [] and any("channel-pruned" in r for r in result.summary["reached_bundle"])
    bench = tmp_path / "bench.json"
    run_cli("bench", result.bundle, "--baseline", "--no-sweep", "--runs", "20", "--min-seconds", "0.05",
            "--batch-sizes", "1", "--no-write-recommended", "--json", bench, cwd=tmp_path)
    data = json.loads(bench.read_text())
    base = data["baseline"]
    assert base["ok"] and base["speedup_p50"] == pytest.approx(base["p50_ms"] / data["latency_ms"]["p50"])
    paired = base["speedup"]  # interleaved rounds: the gate judges their lower bound, not the median
    assert paired["rounds"] == 9 and len(paired["ratios"]) == 9 and paired["bound_rank"] == 2
    assert paired["min"] <= paired["lower_bound"] <= paired["median"] <= paired["max"]
    assert base["params"] > 2 * json.loads((result.bundle / "manifest.json").read_text())["size"]["reference_fp32_bytes"] / 4
    fails = run_cli("check", result.bundle, "--bench", bench, "--min-speedup", "1000", cwd=tmp_path, check=1)
    assert "min_speedup" in fails.stdout and "uncompressed" in fails.stdout and "min_speedup" in fails.stderr
    assert "lower bound" in " ".join(fails.stdout.split())
    run_cli("check", result.bundle, "--bench", bench, "--min-speedup", "0.001", "--max-drop", "100", cwd=tmp_path)
    report = (write_report(build_dir, bench=bench)["markdown"]).read_text()
    assert "Uncompressed model" in report and "same run" in report


# --- channels mode without a ratio: the ratio chosen by the accuracy budget --------------------------

CHANNELS = ["--model", "mlp", "--target", "desktop-gpu", "--precision", "fp32", "--epochs", "6",
            "--stages", "train,prune,export", "--set", "prune.mode=channels", "--set", "prune.steps=1"]


def _prune_info(tmp_path):
    build = json.loads((tmp_path / "edgec-out" / "desktop-gpu" / "build.json").read_text())
    return next(s["info"] for s in build["stages"] if s["kind"] == "prune"), build["accuracy_budget"]


def test_channel_ratio_is_chosen_by_the_budget(tmp_path):
    """No ratio: the largest ratio whose recovered model stays within the prune's share ships (before:
    a fixed 0.5 whatever the model)."""
    from edgec.pipeline.stages.prune import CHANNEL_RATIOS
    from support import run_cli

    run_cli("build", *CHANNELS, cwd=tmp_path)
    prune, budget = _prune_info(tmp_path)
    search = prune["ratio_search"]
    assert budget["met"] and search["share_pt"] == 0.5
    accepted = [t for t in search["trials"] if t["accepted"]]
    assert accepted and all(t["drop_pt"] <= 0.5 for t in accepted)
    assert search["chosen"] == max(t["ratio"] for t in accepted)
    # every larger ratio tried failed: the chosen one is the largest within the share
    assert all(not t["accepted"] for t in search["trials"] if t["ratio"] > search["chosen"])
    assert search["chosen"] in CHANNEL_RATIOS and prune["channels"]["macs_removed"] > 0


def test_explicit_channel_ratio_is_used_as_given(tmp_path):
    from support import run_cli

    run_cli("build", *CHANNELS, "--set", "prune.ratio=0.75", "--set", "budget.enforce=false", cwd=tmp_path)
    prune, _ = _prune_info(tmp_path)
    assert "ratio_search" not in prune
    assert all(after <= before // 4 + 1 for before, after in
               (widths for name, widths in prune["channels"]["layers"].items() if name != "out"))

