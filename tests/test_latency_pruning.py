"""Latency-driven channel pruning (prune.mode = "channels" with target_speedup / max_p50_ms)."""

import io
import math

import numpy as np
import pytest
from rich.console import Console

from edgec.config import parse_config
from edgec.base.data import load_dataset
from edgec.base.errors import ConfigError
from edgec.pipeline.algorithms.latency_table import (
    CACHE_STAGE, cached_table, channel_groups, host_identity, runtime_identity, table_key,
)
from edgec.ondevice.paired import DEFAULT_ROUNDS
from edgec.pipeline.algorithms.netadapt import MAX_PATHS, furthest_meeting_target, furthest_within, greedy_path
from edgec.pipeline.cache import StageCache, stable_hash
from edgec.pipeline.runner import check_chain, run_chain
from edgec.pipeline.stage import StageContext
from edgec.pipeline.stages.prune import PruneConfig, PruneStage
from edgec.pipeline.stages.prune_latency import CALIBRATION_SAMPLES, latency_key_material
from edgec.targets.profile import load_target
from support import zoo_source

RPI = load_target("rpi")


@pytest.fixture(scope="module")
def digits_source(tmp_path_factory):
    """cnn-small (untrained, seed 0) on the digits: the prune stage's input."""
    data = load_dataset("digits")
    cache = StageCache(tmp_path_factory.mktemp("cache"))
    return zoo_source(cache, "cnn-small", data, channels=[16, 32]), data, cache


def _key(model, data, target, cfg):
    example = data.to_input(data.x_train[:CALIBRATION_SAMPLES])[:1]
    identity = latency_key_material(cfg, target)
    return table_key(model, example.shape[1:], target, cfg.latency_threads, cfg.latency_widths, importance=cfg.importance,
                     round_to=cfg.round_to, runtime=identity["runtime"], host=identity["host"])


def test_table_key_names_shape_profile_and_threads_and_the_table_is_served_from_the_cache(digits_source, tmp_path):
    source, data, _ = digits_source
    from edgec.base.architecture import ModelTrust
    model = source.checkpoint().build(ModelTrust())
    args = dict(importance="l2", round_to=None, runtime=runtime_identity(RPI), host=host_identity())
    base = stable_hash(table_key(model, (1, 8, 8), RPI, 1, [0.5], **args))
    assert base == stable_hash(table_key(model, (1, 8, 8), RPI, 1, [0.5], **args))  # same inputs, same key
    desktop = load_target("desktop-gpu")
    others = [table_key(model, (1, 16, 16), RPI, 1, [0.5], **args),  # input shape
              table_key(model, (1, 8, 8), desktop, 1, [0.5], **{**args, "runtime": runtime_identity(desktop)}),  # profile
              table_key(model, (1, 8, 8), RPI, 2, [0.5], **args),  # threads
              table_key(model, (1, 8, 8), RPI, 1, [0.5], **{**args, "host": {**args["host"], "cpu": "another CPU"}}),
              table_key(model, (1, 8, 8), RPI, 1, [0.5], **args, device="emulated-arm64")]  # the emulated Pi core
    assert len({base, *map(stable_hash, others)}) == 6
    cache, built = StageCache(tmp_path / "cache"), []

    def build():
        built.append(1)
        return {"dense_ms": 1.0, "narrowest_ms": 0.5, "widths": [0.5], "groups": {}}

    first, hit1 = cached_table(cache, table_key(model, (1, 8, 8), RPI, 1, [0.5], **args), build)
    second, hit2 = cached_table(cache, table_key(model, (1, 8, 8), RPI, 1, [0.5], **args), build)
    assert (hit1, hit2, len(built)) == (False, True, 1) and first == second
    assert (tmp_path / "cache" / CACHE_STAGE).is_dir()


def test_a_host_where_width_buys_nothing_gets_one_line_and_an_unpruned_model(digits_source):
    """A flat table (every width measures the dense latency): the stage says so in one line and passes the
    model through with its shapes; the table comes from the build's cache, keyed as the stage keys it."""
    source, data, cache = digits_source
    from edgec.base.architecture import ModelTrust
    model = source.checkpoint().build(ModelTrust())
    cfg = PruneConfig(mode="channels", target_speedup=2.0, retrain={"epochs": 1})
    example = data.to_input(data.x_train[:1])
    import torch
    groups = channel_groups(model, torch.from_numpy(example))
    flat = {"widths": [0.5, 0.25], "dense_ms": 0.13, "narrowest_ms": 0.128,
            "groups": {g.name: {"layers": list(g.layers), "channels": g.channels, "ms": {"0.5": 0.13, "0.25": 0.129}}
                       for g in groups}}
    cached_table(cache, _key(model, data, RPI, cfg), lambda: flat)
    out = io.StringIO()
    ctx = StageContext(data=data, seed=0, target=RPI, console=Console(file=out, width=400))
    (step,) = run_chain([PruneStage(cfg)], source, ctx, cache)
    lines = [ln for ln in out.getvalue().splitlines() if "prune:" in ln]
    assert len(lines) == 1 and "not pruning: width buys no latency here" in lines[0] and "1.02x < 1.1x" in lines[0]
    record = step.artifact.info["latency"]
    assert record["pruned"] is False and record["table_cached"] is True
    after = step.artifact.checkpoint().build(ctx.trust)
    assert {k: v.shape for k, v in after.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_build_meets_its_target_speedup_measured_in_the_targets_runtime(tmp_path):
    """The real path: a conv model big enough that width costs time on any x86 host (two 3x3 convs, 128 and
    256 channels, at 32x32), its latency table measured with TFLite int8 in ai-edge-litert, the narrowed
    model measured again: the stage reports the target met, the channels are gone, the table is cached."""
    digits = load_dataset("digits")
    up = lambda a: np.kron(a, np.ones((1, 1, 4, 4), dtype=a.dtype))  # noqa: E731 (8x8 -> 32x32)
    # 200 training images: the recovery epoch is what costs here, and accuracy is not what this tests
    np.savez(tmp_path / "d32.npz", x_train=up(digits.x_train[:200]), y_train=digits.y_train[:200],
             x_test=up(digits.x_test[:50]), y_test=digits.y_test[:50])
    data = load_dataset(f"npz:{tmp_path / 'd32.npz'}")
    cache = StageCache(tmp_path / "cache")
    source = zoo_source(cache, "cnn-small", data, channels=[128, 256])
    ctx = StageContext(data=data, seed=0, target=RPI, console=Console(quiet=True), budget_pt=100.0)  # speed, not accuracy
    cfg = PruneConfig(mode="channels", target_speedup=1.5, latency_widths=[0.25], retrain={"epochs": 1})
    (step,) = run_chain([PruneStage(cfg)], source, ctx, cache)
    record = step.artifact.info["latency"]
    assert record["pruned"] and record["target_met"], record
    assert record["measured_speedup"] >= 1.5 and record["table"]["dense_ms"] / record["table"]["narrowest_ms"] >= 1.5
    # judged as the gate judges: on the lower confidence bound of the paired rounds' speedups, not their median
    assert record["speedup_lower_bound"] >= 1.5 and record["speedup_lower_bound"] <= record["measured_speedup"]
    assert record["speedup_rounds"]["rounds"] == DEFAULT_ROUNDS == len(record["speedup_rounds"]["ratios"])
    assert step.artifact.info["channels"]["macs"][1] < step.artifact.info["channels"]["macs"][0] / 2
    assert len(list((tmp_path / "cache" / CACHE_STAGE).iterdir())) == 1


def test_latency_table_is_timed_in_one_paired_run_so_a_drifting_machine_does_not_scramble_it(digits_source):
    """A busy host (or qemu on one) runs each process, and each round within it, at another speed: the
    table's models are timed in ONE call, each as the dense p50 times its median per-round ratio, so the
    table keeps the models' true ratios (here their MACs) whatever the drift. Timed one call per model,
    as before, the same drift made a narrowed group "slower" than the dense model."""
    import torch

    from edgec.base.architecture import ModelTrust
    from edgec.pipeline.algorithms.channels import model_cost
    from edgec.pipeline.algorithms.latency_table import build_table, narrowed, paired_p50s_ms

    source, data, _ = digits_source
    model = source.checkpoint().build(ModelTrust()).eval()
    example = torch.from_numpy(data.to_input(data.x_train[:1]))
    groups = channel_groups(model, example)
    calls = []

    def drifting_machine(models):
        calls.append(len(models))
        process_speed = (1.0, 2.3, 0.6)[len(calls) % 3]
        rounds = [[process_speed * load * model_cost(m, example)["macs"] for m in models] for load in (1.0, 1.7, 0.8, 1.2, 0.9)]
        return paired_p50s_ms(rounds)

    table = build_table(model, example, groups, [0.5, 0.25], drifting_machine)
    assert calls == [1 + 2 * len(groups) + 1]
    dense_macs = model_cost(model, example)["macs"]
    for g in groups:
        for w in (0.5, 0.25):
            macs = model_cost(narrowed(model, example, groups, {g.name: w})[0], example)["macs"]
            assert table["groups"][g.name]["ms"][str(w)] / table["dense_ms"] == pytest.approx(macs / dense_macs)
            assert table["groups"][g.name]["ms"][str(w)] < table["dense_ms"]


def test_the_meter_converts_each_shape_once_and_times_all_models_of_a_call_together(tmp_path):
    """Latency depends on shapes: the same architecture with other weights (a group too narrow to lose a
    channel at round_to, the dense reference timed again beside each candidate) is not converted again
    (a conversion costs 10-100 s); every model of the call gets a figure, the same-shaped ones alike."""
    import torch
    from torch import nn

    from edgec.pipeline.algorithms.latency_table import LatencyMeter

    def conv_net(width, seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, 10)).eval()

    calibration = np.random.default_rng(0).random((8, 1, 16, 16), dtype=np.float32)
    meter = LatencyMeter(torch.from_numpy(calibration[:1]), calibration, RPI, 1, tmp_path)
    first = meter.p50s_ms([conv_net(16, 0), conv_net(16, 1), conv_net(8, 0)])
    second = meter.p50s_ms([conv_net(16, 2), conv_net(8, 3)])
    assert len(first) == 3 and len(second) == 2 and all(ms > 0 for ms in first + second)
    assert sorted(p.name for p in tmp_path.glob("model-*")) == ["model-0.tflite", "model-1.tflite"]


def test_greedy_path_buys_the_most_latency_per_point_and_skips_groups_that_save_nothing():
    table = {"dense_ms": 10.0, "widths": [0.5, 0.25], "groups": {
        "a": {"ms": {"0.5": 8.0, "0.25": 7.0}},  # 2 ms for 1 pt, then 1 ms for 3 pt
        "b": {"ms": {"0.5": 7.0, "0.25": 5.0}},  # 3 ms for 6 pt, then 2 ms for 0.5 pt
        "c": {"ms": {"0.5": 10.0, "0.25": 10.2}},  # width buys nothing here
    }}
    drops = {"a": {"0.5": 1.0, "0.25": 4.0}, "b": {"0.5": 6.0, "0.25": 6.5}, "c": {"0.5": 0.0, "0.25": 0.0}}
    path = greedy_path(table, drops, target_ms=5.5)
    # a at 0.5 (2 ms/pt) first; then b at 0.5 (0.5 ms/pt) beats a at 0.25 (0.33 ms/pt); 5 ms <= 5.5: done
    assert [p["group"] for p in path] == ["a", "b"] and path[-1]["estimated_ms"] == pytest.approx(5.0)
    assert path[-1]["keep"] == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert greedy_path(table, drops, target_ms=1.0)[-1]["keep"]["c"] == 1.0  # unreachable: c is still never narrowed
    # the furthest point within the allowance: the end first, then a binary search over the rest
    index, best, tried = furthest_within(path, lambda keep: (sum(1 - w for w in keep.values()), keep), 0.6)
    assert index == 0 and best == path[0]["keep"] and [t["step"] for t in tried] == [1, 0]


def _overshooting_table():
    """Three groups each saving 3 ms of 10 alone: the additive estimate says two of them make 4 ms."""
    return {"dense_ms": 10.0, "widths": [0.5], "groups": {g: {"ms": {"0.5": 7.0}} for g in "abc"}}


def _measured(keep):
    """What the runtime says: each narrowed group saves only 2 ms (the fixed per-operator cost stays)."""
    return 10.0 - 2.0 * sum(w < 1.0 for w in keep.values())


def test_greedy_path_goes_on_until_the_measured_latency_meets_the_target_when_the_estimate_overshoots():
    drops = {g: {"0.5": 0.1} for g in "abc"}
    estimated_only = greedy_path(_overshooting_table(), drops, target_ms=5.0)
    assert len(estimated_only) == 2 and _measured(estimated_only[-1]["keep"]) == 6.0  # the estimate alone stops short
    path = greedy_path(_overshooting_table(), drops, target_ms=5.0, measure=_measured)
    assert len(path) == 3 and path[-1]["measured_ms"] == 4.0 and path[-1]["estimated_ms"] == pytest.approx(1.0)
    assert [p.get("measured_ms") for p in path] == [None, 6.0, 4.0]  # timed from where the estimate reached the target


def test_greedy_path_times_where_the_estimate_corrected_by_the_last_measurement_reaches_the_target():
    """Ten groups the table says save 3 ms each of 30, the runtime 1.5: timed at every step from where the
    raw estimate reached 15 ms, the path cost 6 conversions; scaled by the half the first measurement
    realized, it costs 2, and ends at the same point."""
    table = {"dense_ms": 30.0, "widths": [0.5], "groups": {f"g{i}": {"ms": {"0.5": 27.0}} for i in range(10)}}
    drops = {g: {"0.5": 0.1} for g in table["groups"]}
    timed = []

    def measure(keep):
        timed.append(keep)
        return 30.0 - 1.5 * sum(w < 1.0 for w in keep.values())

    path = greedy_path(table, drops, target_ms=15.0, measure=measure)
    assert len(path) == 10 and path[-1]["measured_ms"] == 15.0
    assert [i for i, p in enumerate(path) if "measured_ms" in p] == [4, 9] and len(timed) == 2


def test_greedy_path_ends_honestly_at_its_best_measured_point_when_the_target_is_out_of_reach():
    drops = {g: {"0.5": 0.1} for g in "abc"}
    path = greedy_path(_overshooting_table(), drops, target_ms=3.0, measure=_measured)
    assert len(path) == 3 and path[-1]["keep"] == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert path[-1]["measured_ms"] == 4.0 > 3.0  # every group narrowed: the measured 4 ms is what there is


def _path_for(aim_ms: float, narrowest_step: int = 9) -> list[dict]:
    """A path from a 10 ms model: step i narrows group g to 1 - 0.1 i and saves 1 ms, until the aim."""
    steps = min(narrowest_step, int(math.ceil(10.0 - aim_ms - 1e-9)))
    return [{"keep": {"g": round(1.0 - 0.1 * i, 6)}, "estimated_ms": 10.0 - i} for i in range(1, steps + 1)]


def _slower_after_recovery(extra_ms: float):
    return lambda result: 10.0 - 10.0 * (1.0 - result["g"]) + extra_ms  # the path point's latency + extra


def test_a_recovered_model_measured_short_of_the_target_sends_a_path_aimed_lower():
    """The path ended where a point measured 5 ms before recovery; the recovered model measured 6 ms
    (a busier moment, or the recovery): a path aimed at 5 x 5/6 ms is walked, recovered and kept."""
    recovered = lambda keep: (0.0, dict(keep))  # noqa: E731: within the allowance everywhere
    path, index, result, _, ms, paths = furthest_meeting_target(_path_for, recovered, 0.5, _slower_after_recovery(1.0), 5.0)
    assert [p["aim_ms"] for p in paths] == pytest.approx([5.0, 5.0 * 5.0 / 6.0])
    assert result["g"] == pytest.approx(0.4) and index == len(path) - 1 and ms <= 5.0 + 1e-9


def test_no_lower_path_where_accuracy_stopped_the_path_or_nothing_narrower_is_left():
    within = lambda keep: (0.0 if keep["g"] >= 0.5 else 1.0, dict(keep))  # noqa: E731: narrower loses 1 pt
    *_, result, _, ms, paths = furthest_meeting_target(_path_for, within, 0.5, _slower_after_recovery(1.0), 5.0)
    assert len(paths) == 2 and result["g"] == pytest.approx(0.5) and ms == pytest.approx(6.0)  # honest: short
    capped = lambda aim: _path_for(aim, narrowest_step=5)  # noqa: E731: g = 0.5 is as narrow as it goes
    everything = lambda keep: (0.0, dict(keep))  # noqa: E731
    *_, ms, paths = furthest_meeting_target(capped, everything, 0.5, _slower_after_recovery(1.0), 5.0)
    assert len(paths) == 1 and ms == pytest.approx(6.0)  # the lower aim reached the same model: not trained again
    *_, paths = furthest_meeting_target(_path_for, everything, 0.5, _slower_after_recovery(3.0), 5.0)
    assert len(paths) == MAX_PATHS  # bounded


def test_with_measurements_groups_the_table_saw_save_nothing_are_narrowed_last_each_step_timed():
    """The table's single-group timing of c came out slower than dense (noise: narrowing c does cut its
    work); when a and b narrowed still miss the target, the measured path narrows c too and times it."""
    table = {"dense_ms": 10.0, "widths": [0.5], "groups": {
        "a": {"ms": {"0.5": 8.0}}, "b": {"ms": {"0.5": 8.0}}, "c": {"ms": {"0.5": 10.3}}, "d": {"ms": {"0.5": 10.1}}}}
    drops = {"a": {"0.5": 0.1}, "b": {"0.5": 0.2}, "c": {"0.5": 0.3}, "d": {"0.5": 0.9}}
    measured = lambda keep: 10.0 - 2.0 * sum(w < 1.0 for w in keep.values())  # noqa: E731: every group saves 2 ms
    path = greedy_path(table, drops, target_ms=4.0, measure=measured)
    assert [p["group"] for p in path] == ["a", "b", "c"]  # c (cheaper in accuracy than d) only after a and b
    assert path[-1]["measured_ms"] == 4.0
    assert greedy_path(table, drops, target_ms=4.0)[-1]["keep"]["c"] == 1.0  # by the estimate alone: never


def test_latency_measured_on_the_emulated_pi_core_sees_width(tmp_path):
    """latency_device = "emulated-arm64": the int8 TFLite model timed under qemu as a Cortex-A72 (the
    Pi 4's core, where compute, not per-operator overhead, decides): 8x the channels is much slower."""
    import os
    import shutil

    import torch
    from torch import nn

    from edgec.pipeline.algorithms.latency_table import LatencyMeter
    from edgec.pipeline.stages.prune_latency import emulated_python

    if os.environ.get("EDGEC_SKIP_EMULATION") == "1" or shutil.which("qemu-aarch64-static") is None:
        pytest.skip("no qemu-aarch64-static (or EDGEC_SKIP_EMULATION=1)")
    torch.manual_seed(0)
    calibration = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    example = torch.from_numpy(calibration[:1])
    python = emulated_python(RPI)

    def conv_net(width):
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()

    meter = LatencyMeter(example, calibration, RPI, 1, tmp_path, emulated=python)
    narrow, wide = meter.p50s_ms([conv_net(16), conv_net(128)])  # one qemu process, alternating rounds
    assert 0 < narrow and wide > 4 * narrow, (narrow, wide)


def test_emulated_latency_device_is_refused_for_a_target_that_does_not_export_tflite():
    cfg = parse_config({"stages": [{"kind": "prune", "mode": "channels", "target_speedup": 2.0,
                                    "latency_device": "emulated-arm64"}]}).stages[0].config
    with pytest.raises(ConfigError, match='latency_device = "emulated-arm64" times TFLite models') as e:
        latency_key_material(cfg, load_target("desktop-gpu"))
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


@pytest.mark.parametrize("keys, message", [
    ({"mode": "layer", "target_speedup": 2.0}, 'target_speedup applies to mode = "channels", not "layer"'),
    ({"mode": "channels", "target_speedup": 2.0, "max_p50_ms": 1.0}, "not both"),
    ({"mode": "channels", "target_speedup": 1.0}, "greater than 1"),
    ({"mode": "channels", "target_speedup": 2.0, "ratio": 0.5}, "remove ratio"),
    ({"mode": "channels", "latency_widths": [0.5]}, "need target_speedup or max_p50_ms"),
    ({"mode": "channels", "max_p50_ms": 1.0, "latency_widths": [0.5, 1.0]}, "distinct fractions in"),
])
def test_latency_targets_are_refused_at_plan_time(keys, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_config({"stages": [{"kind": "prune", **keys}]})
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_plan_time_check_needs_a_group_to_narrow(digits_source):
    source, data, _ = digits_source
    ctx = StageContext(data=data, seed=0, target=RPI, console=Console(quiet=True))
    check_chain([PruneStage(PruneConfig(mode="channels", target_speedup=2.0))], source, ctx)  # cnn-small: 2 groups


def test_a_new_timing_method_changes_the_prune_stages_key(monkeypatch):
    """A stage output chosen on latencies timed by an older method (e.g. unpaired one-shot timings) is
    not served once the timing or the judging changes: TABLE_VERSION and JUDGED_ON are part of the
    stage's key material."""
    from edgec.pipeline.stages import prune_latency

    cfg = parse_config({"stages": [{"kind": "prune", "mode": "channels", "target_speedup": 2.0}]}).stages[0].config
    before = stable_hash(latency_key_material(cfg, RPI))
    assert before == stable_hash(latency_key_material(cfg, RPI))
    monkeypatch.setattr(prune_latency, "TABLE_VERSION", prune_latency.TABLE_VERSION + 1)
    assert stable_hash(latency_key_material(cfg, RPI)) != before
    timing_changed = stable_hash(latency_key_material(cfg, RPI))
    monkeypatch.setattr(prune_latency, "JUDGED_ON", "median")  # judging a candidate another way: another output
    assert stable_hash(latency_key_material(cfg, RPI)) != timing_changed
