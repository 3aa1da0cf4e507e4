"""prune, channels mode with ``target_speedup`` / ``max_p50_ms``: channel widths chosen by measured latency.

1. The latency table (``algorithms/latency_table.py``): the model exported as the target's bundles
   are and timed in their runtime on this host, dense, with each channel group narrowed alone, and
   with every group at its narrowest; cached in the build's stage cache.
2. When even the narrowest widths are not :data:`MIN_USEFUL_SPEEDUP` faster here, one line says so
   and the model passes through unpruned: no accuracy is spent on speed this host does not give.
3. Otherwise NetAdapt's greedy path (``algorithms/netadapt.py``) towards the target: the table
   ranks the steps, and each candidate the table says is fast enough is exported and timed again,
   so the path ends where the *measured* latency meets the target. Measured means what the speedup
   gate judges: the candidate and the dense model timed together in paired rounds, and the lower
   confidence bound of the per-round speedups, not their median: a bundle whose median just meets the
   target fails ``edgec check --min-speedup`` about every other run. Then the furthest point of it
   whose validation drop after a recovery (``retrain``) stays within the stage's share of the
   accuracy budget; its speedup is measured once more and reported (median and bound). Where that
   recovered model falls short of the target, a path aimed lower is walked (``furthest_meeting_target``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..accuracy_budget import stage_baseline
from ..algorithms.channels import channel_report, channel_widths, model_cost
from ..algorithms.latency_table import (
    TABLE_VERSION, LatencyMeter, best_speedup, build_table, cached_table, channel_groups, host_identity, narrowed,
    runtime_identity, table_key,
)
from ..algorithms.netadapt import furthest_meeting_target, greedy_path
from ..algorithms.pruning import MaskEnforcer, apply_masks
from edgec.base.emulation import emulated_identity
from edgec.base.errors import ConfigError

from ..artifact import CHECKPOINT_FILE, Artifact
from ..compression_info import compressed_model_info
from ..stage import StageContext
from ..training import fit

MIN_USEFUL_SPEEDUP = 1.1  # below this at the narrowest widths, width does not buy latency on this host
JUDGED_ON = "paired-lower-bound, recovered"  # the bound of paired rounds, after recovery too (netadapt.py)
CALIBRATION_SAMPLES = 32  # the table's int8 conversions: ranges do not change the latency


@dataclass
class Recovered:
    """A narrowed model after its recovery, and its speedup once measured (``final_ms``)."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    speed: dict[str, Any] | None = None


def latency_key_material(cfg, target) -> dict[str, Any]:
    """What besides the model decides the stage's output: the runtime, the device (this CPU or the
    emulated core), the threads, and how latency is timed and judged (``TABLE_VERSION``,
    ``JUDGED_ON``: a stage output chosen by an older method is not served)."""
    common = {"target": {"format": target.format, "precision": target.precision}, "timing": TABLE_VERSION,
              "judged_on": JUDGED_ON, "device": cfg.latency_device, "threads": cfg.latency_threads}
    if cfg.latency_device == "host":
        return {**common, "runtime": runtime_identity(target), "host": host_identity()}
    python = emulated_python(target)
    return {**common, "runtime": {"name": "tflite", "package": python.info["runtime"],
                                  "version": python.info["runtime_version"]}, "host": emulated_identity(python)}


def emulated_python(target):
    """The emulated Pi 4 core's Python with ai-edge-litert (built once, cached)."""
    from edgec.base.emulation import DEFAULT_CACHE_DIR, prepare_arm64_python

    if target.format != "tflite":
        raise ConfigError(f'prune: latency_device = "emulated-arm64" times TFLite models; target {target.name!r} '
                          f'exports {target.format}: use latency_device = "host"')
    return prepare_arm64_python(DEFAULT_CACHE_DIR, "ai-edge-litert")


def run_latency_pruning(stage, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    cfg, data = stage.config, ctx.data
    ckpt = source.checkpoint()
    model = ckpt.build(ctx.trust).eval()
    apply_masks(model, ckpt.masks)
    calibration = data.to_input(data.x_train[:CALIBRATION_SAMPLES])
    example = torch.from_numpy(calibration[:1])
    groups = channel_groups(model, example)
    identity = latency_key_material(cfg, ctx.target)
    key = table_key(model, example.shape[1:], ctx.target, cfg.latency_threads, cfg.latency_widths,
                    importance=cfg.importance, round_to=cfg.round_to, runtime=identity["runtime"], host=identity["host"],
                    device=identity["device"])
    emulated = emulated_python(ctx.target) if cfg.latency_device == "emulated-arm64" else None
    with tempfile.TemporaryDirectory(prefix="edgec-latency-") as tmp:
        meter = LatencyMeter(example, calibration, ctx.target, cfg.latency_threads, Path(tmp), emulated=emulated)
        table, cached = cached_table(ctx.cache, key, lambda: build_table(
            model, example, groups, cfg.latency_widths, meter.p50s_ms, importance=cfg.importance, round_to=cfg.round_to,
            progress=lambda line: ctx.console.print(f"{stage.id}: {line}")))
        return _prune_or_say_why(stage, ckpt, model, example, groups, table, cached, identity, meter, ctx, out_dir)


def _prune_or_say_why(stage, ckpt, model, example, groups, table, cached, identity, meter, ctx, out_dir):
    cfg, data = stage.config, ctx.data

    def speedup_of(candidate: nn.Module) -> dict[str, Any]:
        """The candidate's speedup over the dense model, the two timed together in paired rounds."""
        return meter.speedup(model, candidate)

    where = (f"{identity['host']['cpu'] or 'this CPU'}, {identity['runtime']['package']} {identity['runtime']['version']} "
             f"{ctx.target.precision}, {cfg.latency_threads} thread(s)")
    record: dict[str, Any] = {"table": table, "table_cached": cached, "measured_on": where,
                              "best_speedup": best_speedup(table), "target_speedup": cfg.target_speedup,
                              "max_p50_ms": cfg.max_p50_ms}
    if best_speedup(table) < MIN_USEFUL_SPEEDUP:
        line = no_speed_line(stage.id, table, where)
        ctx.console.print(line)
        return _unpruned(ckpt, model, data, out_dir, {**record, "pruned": False, "reason": line})
    return _prune_along_path(stage, ckpt, model, example, groups, table, speedup_of, ctx, out_dir, record)


def no_speed_line(stage_id: str, table: dict[str, Any], where: str) -> str:
    """The one line for a host where width does not buy latency."""
    return (f"{stage_id}: not pruning: width buys no latency here ({where}): every channel group at "
            f"{min(table['widths']):.0%} of its channels measured {table['narrowest_ms']:.3g} ms p50 vs "
            f"{table['dense_ms']:.3g} ms dense ({best_speedup(table):.2f}x < {MIN_USEFUL_SPEEDUP}x)")


def target_ms(cfg, table: dict[str, Any]) -> float:
    return table["dense_ms"] / cfg.target_speedup if cfg.target_speedup is not None else cfg.max_p50_ms


def _prune_along_path(stage, ckpt, model, example, groups, table, speedup_of, ctx: StageContext, out_dir: Path,
                      record: dict[str, Any]) -> dict[str, Any]:
    cfg, data = stage.config, ctx.data
    baseline = stage_baseline(model, ctx, "prune")  # judged against the trained reference, as the budgeted prune is
    drop_of = baseline.drop

    def narrow(keep: dict[str, float]):
        return narrowed(model, example, groups, keep, importance=cfg.importance, round_to=cfg.round_to,
                        masks=dict(ckpt.masks))

    drops = {g.name: {str(w): drop_of(narrow({g.name: w})[0]) for w in cfg.latency_widths} for g in groups}
    share = baseline.allowance

    def path_for(aim_ms: float):
        # the path's measured latency is the gate's figure: dense over the speedup's lower confidence bound
        return greedy_path(table, drops, aim_ms,
                           measure=lambda keep: table["dense_ms"] / speedup_of(narrow(keep)[0])["lower_bound"])

    def final_ms(result: Recovered) -> float:
        result.speed = speedup_of(result.model)
        return table["dense_ms"] / result.speed["lower_bound"]

    def trial(keep: dict[str, float]):
        candidate, masks = narrow(keep)
        label = f"{stage.id} recovery ({len([w for w in keep.values() if w < 1])} groups narrowed)"
        if masks:
            with MaskEnforcer(candidate, masks) as enforcer:
                fit(candidate, data, cfg.retrain, ctx.seed, ctx.console, label=label, after_step=enforcer.reapply)
        else:
            fit(candidate, data, cfg.retrain, ctx.seed, ctx.console, label=label)
        return drop_of(candidate.eval()), Recovered(candidate, masks)

    path, index, best, tried, _, aims = furthest_meeting_target(path_for, trial, share, final_ms, target_ms(cfg, table))
    record.update(drops=drops, path=path, trials=tried, share_pt=share, paths=aims)
    if index is None:
        line = (f"{stage.id}: not pruning: no step towards {target_ms(cfg, table):.3g} ms recovered within "
                f"{share:.2g} pt of validation accuracy (measured on {record['measured_on']})")
        ctx.console.print(line)
        return _unpruned(ckpt, model, data, out_dir, {**record, "pruned": False, "reason": line})
    pruned_model, masks, speed = best.model, best.masks, best.speed
    measured = table["dense_ms"] / speed["median"]
    met = table["dense_ms"] / speed["lower_bound"] <= target_ms(cfg, table) + 1e-12
    record.update(pruned=True, chosen=path[index]["keep"], estimated_ms=path[index]["estimated_ms"],
                  measured_ms=measured, measured_speedup=speed["median"], speedup_lower_bound=speed["lower_bound"],
                  speedup_rounds=speed, target_met=met, drop_pt=next(t["drop_pt"] for t in tried if t["step"] == index))
    ctx.console.print(
        f"{stage.id}: {speed['median']:.2f}x measured ({table['dense_ms']:.3g} -> {measured:.3g} ms p50 on "
        f"{record['measured_on']}; {speed['confidence']:.0%} lower bound {speed['lower_bound']:.2f}x over "
        f"{speed['rounds']} paired rounds), target {_target_text(cfg, table)} {'met' if met else 'NOT met'} "
        f"(judged on the lower bound, as `edgec check --min-speedup` is); validation drop {record['drop_pt']:.2f} pt "
        f"after recovery (share {share:.2g} pt)")
    widths = channel_widths(model)
    cost = model_cost(model, example)
    out = ckpt.with_model(pruned_model, ctx.trust)
    out.masks = masks
    out.codebooks = {}  # retrained: the weights left their shared values
    out.save(out_dir / CHECKPOINT_FILE)
    return {**compressed_model_info(pruned_model, out, data),
            "channels": channel_report(widths, pruned_model, cost, example), "latency": record}


def _target_text(cfg, table) -> str:
    if cfg.target_speedup is not None:
        return f"{cfg.target_speedup:g}x"
    return f"{cfg.max_p50_ms:g} ms"


def _unpruned(ckpt, model: nn.Module, data, out_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    ckpt.save(out_dir / CHECKPOINT_FILE)
    return {**compressed_model_info(model, ckpt, data), "latency": record}
