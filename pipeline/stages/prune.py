"""prune: magnitude pruning (Han et al.), one shot or iterative (prune, retrain, prune harder).

Masks are stored in the checkpoint and enforced by every later stage, so a pruned weight stays
exactly zero through retraining, weight sharing and export.

``mode = "channels"`` removes whole channels instead (structured pruning with Torch-Pruning,
``algorithms/channels.py``): the layers get new, smaller shapes, recorded in the architecture
record, so every later stage and the exported graph are genuinely smaller and faster. Masks from
earlier unstructured pruning are sliced with their weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from pydantic_core import to_jsonable_python
from torch import nn

from edgec.base import architecture
from edgec.base.data import Dataset
from edgec.base.errors import ConfigError

from ..artifact import CHECKPOINT_FILE, Artifact
from ..compression_info import compressed_model_info
from ..extensions import PER_WEIGHT
from ..algorithms.channels import (
    ChannelPruner, ChannelSpec, accumulate_gradients, channel_report, channel_widths, model_cost,
)
from ..accuracy_budget import allowance_pt, drop_points, stage_baseline
from ..algorithms.pruning import (
    GlobalSparsity, LayerSparsity, MaskEnforcer, ThresholdPruning, apply_masks, compute_masks, per_layer,
    prunable_layers, sparsity_schedule,
)
from ..algorithms.latency_table import channel_groups, runtime_identity
from ..algorithms.sensitivity import (
    CANDIDATES, CONFIDENCE_GUARD_PT, search_level, sensitivity_curves, sparsity_levels,
)
from ..stage import Probe, Stage, StageConfig, StageContext
from ..training import OptimConfig, fit, resolve_device
from .prune_latency import latency_key_material, run_latency_pruning


class PruneConfig(StageConfig):
    """The keys every mode has. One config per mode (``PRUNE_MODES``): ``PruneConfig(**keys)`` and
    ``PruneConfig.model_validate(keys)`` give the config of the keys' ``mode`` (default "layer"), so a
    key of another mode is refused with one line instead of silently entering the cache key."""

    mode: Literal["threshold", "layer", "global", "channels"] = Field(
        "layer", description="threshold: |w| >= quality*std per layer (Han); layer: target sparsity per layer name/type; global: one "
        "threshold; channels: remove whole channels (structured: smaller and faster, not only sparser)"
    )
    steps: int = Field(3, ge=1, description="pruning rounds; between rounds the model is retrained with masks fixed")
    schedule: Literal["cubic", "linear"] = "cubic"
    retrain: OptimConfig = Field(OptimConfig(epochs=3, patience=3), description="training between rounds")

    def __new__(cls, /, **keys: Any):
        return super().__new__(cls.config_class(keys))

    @classmethod
    def config_class(cls, keys: Any) -> type[PruneConfig]:
        """The config of ``keys``' mode when asked of the common base (an unknown mode stays with the
        base, whose ``mode`` field then names the valid ones)."""
        if cls is not PruneConfig or not isinstance(keys, dict):
            return cls
        return PRUNE_MODES.get(keys.get("mode", "layer"), cls)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> PruneConfig:
        return super(PruneConfig, cls.config_class(obj)).model_validate(obj, **kwargs)

    @model_validator(mode="before")
    @classmethod
    def _keys_of_other_modes(cls, data: Any) -> Any:
        for key in sorted(set(data) - set(cls.model_fields)) if isinstance(data, dict) else []:
            owners = [mode for mode, config in PRUNE_MODES.items() if key in config.model_fields]
            if owners:
                named = " or ".join(f'"{mode}"' for mode in owners)
                raise ValueError(f'{key} applies to mode = {named}, not "{data.get("mode", "layer")}"')
        return data

    @property
    def latency_driven(self) -> bool:
        """Channels chosen by measured latency (ChannelPruneConfig's target_speedup / max_p50_ms)."""
        return False


class ThresholdPruneConfig(PruneConfig):
    mode: Literal["threshold"] = "threshold"
    quality: float | dict[str, float] = Field(1.0, description="threshold mode: quality for all layers or per layer name/type")

    @field_validator("quality")
    @classmethod
    def _quality_range(cls, value):
        for q in value.values() if isinstance(value, dict) else [value]:
            if not q >= 0:
                raise ValueError(f"quality must be >= 0, got {q}")
        return value


class LayerPruneConfig(PruneConfig):
    mode: Literal["layer"] = "layer"
    sparsity: float | dict[str, float] | None = Field(
        None, description="layer/global modes: target fraction of zeros (all layers, or per name/type); default (layer "
        "mode): ranked per layer by validation sensitivity, the level searched so that the model after the rounds and a "
        "recovery stays within the stage's share of the accuracy budget")

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, value):
        return _fractions(value, "sparsity")


class GlobalPruneConfig(LayerPruneConfig):
    mode: Literal["global"] = "global"


class ChannelPruneConfig(PruneConfig):
    mode: Literal["channels"] = "channels"
    ratio: float | dict[str, float] = Field(
        0.5, description="channels mode: fraction of output channels removed from every layer, or per layer name/type "
        "(layers named by neither keep theirs); with scope = \"global\" the fraction of all channels; not set: the "
        "largest of CHANNEL_RATIOS whose model after the rounds and a recovery stays within the stage's share of the "
        "accuracy budget")
    importance: Literal["l2", "l1", "taylor", "bn", "lamp", "fpgm"] = Field(
        "l2", description="channels mode: which channels go first: l2/l1 norm of the channel's weights, taylor "
        "(|w x dloss/dw|), bn (BatchNorm scale), lamp, fpgm")
    scope: Literal["layer", "global"] = Field(
        "layer", description="channels mode: layer: every layer loses `ratio` of its channels; global: one importance "
        "ranking over all layers (each loses at most max_ratio)")
    max_ratio: float = Field(0.9, gt=0, lt=1, description="channels mode, global scope: most any layer loses")
    round_to: int | None = Field(
        None, ge=1, description="channels mode: kept channel counts are multiples of this (8 or 16 suit int8 SIMD "
        "kernels); a layer narrower than it keeps its channels")
    taylor_samples: int = Field(256, ge=1, description="channels mode, taylor importance: training samples whose loss "
                                "gradients rank the channels")
    # channels mode, latency-driven (NetAdapt: prune_latency.py); the widths are chosen by measured latency
    target_speedup: float | None = Field(
        None, gt=1, description="channels mode: remove channels until the bundle's int8 model runs this many times faster "
        "than the dense one in the target's runtime on this host (measured), within the accuracy budget; replaces ratio")
    max_p50_ms: float | None = Field(
        None, gt=0, description="channels mode: as target_speedup, for a p50 latency in ms on this host")
    latency_widths: list[float] = Field(
        [0.5, 0.25], min_length=1, max_length=8, description="target_speedup / max_p50_ms: fractions of each channel "
        "group's channels at which the latency table is measured (the widths the search may choose)")
    latency_threads: int = Field(1, ge=1, le=256, description="target_speedup / max_p50_ms: runtime threads of the "
                                 "latency measurements")
    latency_device: Literal["host", "emulated-arm64"] = Field(
        "host", description="target_speedup / max_p50_ms: where latency is measured: this host's CPU, or (TFLite "
        "targets) an emulated Raspberry Pi 4 core (Cortex-A72 under qemu-aarch64, ai-edge-litert; slower to measure)")

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, value):
        return _fractions(value, "ratio")

    @field_validator("latency_widths")
    @classmethod
    def _widths_range(cls, value):
        if any(not 0 < w < 1 for w in value) or len(set(value)) != len(value):
            raise ValueError(f"latency_widths must be distinct fractions in (0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _latency_target(self):
        """target_speedup / max_p50_ms: channels mode only, one of them, instead of ratio."""
        wanted = [k for k in ("target_speedup", "max_p50_ms") if getattr(self, k) is not None]
        if len(wanted) > 1:
            raise ValueError("give target_speedup or max_p50_ms, not both")
        if wanted and {"ratio", "scope"} & self.model_fields_set:
            raise ValueError(f"{wanted[0]} chooses each layer's width itself: remove ratio/scope")
        if not wanted and {"latency_widths", "latency_threads", "latency_device"} & self.model_fields_set:
            raise ValueError("latency_widths / latency_threads / latency_device need target_speedup or max_p50_ms")
        return self

    @property
    def latency_driven(self) -> bool:
        return self.target_speedup is not None or self.max_p50_ms is not None


PRUNE_MODES: dict[str, type[PruneConfig]] = {
    "threshold": ThresholdPruneConfig, "layer": LayerPruneConfig, "global": GlobalPruneConfig, "channels": ChannelPruneConfig,
}


def _fractions(value, name: str):
    for v in value.values() if isinstance(value, dict) else ([] if value is None else [value]):
        if not 0 <= v < 1:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    return value


def _flat_key_config(config: PruneConfig) -> dict[str, Any]:
    """The config as cache keys hash it: every mode's keys, this mode's values and the other modes'
    defaults (the layout of the single flat config before the per-mode split), so existing cache
    entries stay valid."""
    flat: dict[str, Any] = {}
    for mode_config in PRUNE_MODES.values():
        for name, field in mode_config.model_fields.items():
            if name != "data" and not field.is_required():
                flat.setdefault(name, to_jsonable_python(field.get_default(call_default_factory=True)))
    return {**flat, **config.model_dump(mode="json", exclude={"data"})}


SENSITIVITY_VERSION = 3  # bump when the sensitivity analysis chooses differently for the same inputs
# channels mode without a ratio: the ratios the budget chooses from (binary search, sensitivity.search_level)
CHANNEL_RATIOS = (0.1, 0.25, 0.4, 0.5, 0.6, 0.75)


class PruneStage(Stage):
    kind = "prune"
    version = 1
    compresses = True
    Config = PruneConfig

    def check(self, probe: Probe) -> Probe:
        """Every rule the stage will use, resolved against the real model's layers. Channels mode
        prunes a copy of the real model now (no training), so what it returns has the new shapes."""
        resolve_device(self.config.retrain.device)
        if self.config.mode == "channels":
            return self._check_channels(probe)
        if self.budgeted:
            prunable_layers(probe.model)  # something to measure
            return probe
        spec = self._spec(1.0)
        if isinstance(spec, ThresholdPruning):
            per_layer(probe.model, spec.quality, "prune.quality")
        elif isinstance(spec, LayerSparsity):
            per_layer(probe.model, dict(spec.sparsity), "prune.sparsity")
        return probe

    @property
    def budgeted(self) -> bool:
        """No sparsity (layer mode) or channel ratio (channels mode, not latency-driven) set: the stage
        chooses it by validation within its share of the accuracy budget."""
        cfg = self.config
        if cfg.mode == "channels":
            return not cfg.latency_driven and "ratio" not in cfg.model_fields_set
        return cfg.mode == "layer" and cfg.sparsity is None

    def key_material(self, ctx: StageContext) -> dict[str, Any]:
        budget = {"allowance_pt": allowance_pt("prune", ctx.budget_pt), "sensitivity": SENSITIVITY_VERSION,
                  "reference": ctx.reference.digest if ctx.reference is not None else None} if self.budgeted or self.config.latency_driven else {}
        if self.budgeted and self.config.mode == "channels":
            budget["ratios"] = list(CHANNEL_RATIOS)
        latency = {"latency": latency_key_material(self.config, ctx.target)} if self.config.latency_driven else {}
        material = {**super().key_material(ctx), "config": _flat_key_config(self.config)}
        return {**material, "device": resolve_device(self.config.retrain.device), **budget, **latency}

    def reached_bundle(self, info: dict[str, Any], reached: list[str]) -> list[str]:
        if "channels" in info:
            return [*reached, f"channel-pruned ({self.id}, {info['channels']['macs_removed']:.0%} of MACs removed)"]
        total = (info.get("sparsity") or {}).get("total", {}).get("sparsity")
        return [*reached, f"pruned ({self.id}{f', {total:.0%} of weights zero' if total is not None else ''})"]

    def _spec(self, fraction: float, chosen: dict[str, float] | None = None):
        """The pruning rule for one round; ``fraction`` of the way (0..1] through the schedule;
        ``chosen``: the budgeted per-layer sparsities."""
        cfg = self.config
        if chosen is not None:
            return LayerSparsity({k: _at(v, fraction, cfg) for k, v in chosen.items()})
        if cfg.mode == "global" and cfg.sparsity is None:
            raise ConfigError("prune.sparsity: global mode needs a sparsity (one number); leave mode = \"layer\" for "
                              "per-layer sparsities chosen within the accuracy budget")
        if cfg.mode == "threshold":
            return ThresholdPruning(cfg.quality)
        if cfg.mode == "global":
            if isinstance(cfg.sparsity, dict):
                raise ConfigError("prune.sparsity: global mode takes one number, not a per-layer table")
            return GlobalSparsity(_at(cfg.sparsity, fraction, cfg))
        targets = cfg.sparsity if isinstance(cfg.sparsity, dict) else {"conv": cfg.sparsity, "linear": cfg.sparsity}
        return LayerSparsity({k: _at(v, fraction, cfg) for k, v in targets.items()})

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        if self.config.latency_driven:
            return run_latency_pruning(self, source, ctx, out_dir)
        if self.config.mode == "channels":
            return self._run_channels(source, ctx, out_dir)
        ckpt = source.checkpoint()
        model = ckpt.build(ctx.trust)
        masks = dict(ckpt.masks)
        sensitivity = None
        if self.budgeted:
            model, masks, sensitivity = self._budgeted_prune(model, masks, ctx)
        else:
            masks = self._prune_rounds(model, masks, ctx, self._spec, recover=False)
        ckpt.state_dict, ckpt.masks = model.state_dict(), masks
        ckpt.save(out_dir / CHECKPOINT_FILE)
        info = compressed_model_info(model, ckpt, ctx.data)
        return info if sensitivity is None else {**info, "sensitivity": sensitivity}

    def _prune_rounds(self, model: nn.Module, masks: dict[str, torch.Tensor], ctx: StageContext,
                      spec_at: Callable[[float], Any], *, recover: bool, label: str = "") -> dict[str, torch.Tensor]:
        """Prune ``model`` in place over ``steps`` rounds (``spec_at(fraction of the schedule)``),
        retrained between rounds with the masks fixed and, with ``recover``, after the last one too."""
        cfg = self.config
        for step in range(cfg.steps):
            masks = compute_masks(model, spec_at((step + 1) / cfg.steps), existing_masks=masks)
            with MaskEnforcer(model, masks) as enforcer:
                if step < cfg.steps - 1 or recover:
                    fit(model, ctx.data, cfg.retrain, ctx.seed + step, ctx.console,
                        label=f"{self.id}{label} {step + 1}/{cfg.steps}", after_step=enforcer.reapply)
        return masks

    def _budgeted_prune(self, model: nn.Module, masks: dict[str, torch.Tensor], ctx: StageContext):
        """(model, masks, record): the largest sparsity level, ranked by per-layer sensitivity, whose
        validation figure after the stage's rounds and a recovery stays within the prune's allowance
        counted from the trained reference (accuracy_budget.allowance_pt: what earlier stages lost
        is spent, what they gained is passed on; algorithms/sensitivity.py); the unpruned model when
        none does. Without a reference (prune before any train stage) the incoming model is it."""
        baseline = stage_baseline(model, ctx, "prune")
        share, reference, entering = baseline.allowance, baseline.reference, baseline.entering
        curves = sensitivity_curves(model, masks, lambda candidate: baseline.drop(candidate, base=entering))
        levels = sparsity_levels(curves)

        def trial(sparsity: dict[str, float]):
            candidate = copy.deepcopy(model)
            got = self._prune_rounds(candidate, dict(masks), ctx, lambda f: self._spec(f, sparsity), recover=True,
                                     label=f" trial {_shown(sparsity)}")
            return baseline.judge(candidate, CONFIDENCE_GUARD_PT), (candidate, got)

        index, best, tried = search_level(levels, trial)
        chosen = {} if index is None else levels[index]["sparsity"]
        if best is not None:
            model, masks = best
        entering_drop = round(drop_points(reference, entering, baseline.higher), 4)
        record = {"share_pt": share, "confidence_guard_pt": CONFIDENCE_GUARD_PT, "reference_val": reference,
                  "entering_drop_pt": entering_drop, "candidates": list(CANDIDATES), "curves": curves, "levels": levels,
                  "trials": tried,
                  "recovery": {"rounds": self.config.steps, "epochs_per_round": self.config.retrain.epochs},
                  "chosen": chosen,
                  "joint_drop_pt": next((t["drop_pt"] for t in tried if t["level"] == index), entering_drop)}
        ctx.console.print(f"{self.id}: sparsities within {share:.2g} pt of the trained model after recovery: "
                          f"{_shown(chosen) or 'none (no level recovered within the budget)'}")
        return model, masks, record

    # --- channels mode -----------------------------------------------------------------------

    def _channel_spec(self, ratio: float | dict[str, float] | None = None) -> ChannelSpec:
        cfg = self.config
        ratio = cfg.ratio if ratio is None else ratio
        if cfg.scope == "global" and isinstance(ratio, dict):
            raise ConfigError("prune.ratio: scope = \"global\" takes one number, not a per-layer table")
        return ChannelSpec(ratio, importance=cfg.importance, global_ranking=cfg.scope == "global",
                           round_to=cfg.round_to, max_ratio=cfg.max_ratio)

    def _check_channels(self, probe: Probe) -> Probe:
        held = [ns for ns in PER_WEIGHT if probe.extensions.get(ns)]
        if held:
            raise ConfigError(f"prune.mode = \"channels\" cannot follow a learn stage that keeps per-weight state "
                              f"({', '.join(held)}): that state would keep the old shapes; prune channels before learning")
        if self.config.latency_driven:  # widths are chosen at run time, by measured latency
            runtime_identity(probe.target)  # the target's runtime is installed
            if not channel_groups(probe.model, probe.sample()):
                raise ConfigError(f"prune: {type(probe.model).__name__} has no channel group to narrow (only output layers)")
            return probe
        model = copy.deepcopy(probe.model)
        ratio = CHANNEL_RATIOS[-1] if self.budgeted else self.config.ratio
        _, groups, _ = self._prune_channels(model, probe.data, seed=0, masks={}, taylor_samples=16, ratio=ratio)
        if self.budgeted:  # the ratio is chosen at run time, by validation; later stages plan with today's shapes
            if groups == 0:
                raise ConfigError(f"prune: channel pruning would remove no channel of {type(probe.model).__name__} even "
                                  f"at ratio {ratio}; lower round_to or prune weights (mode = \"layer\")")
            return probe
        ratios = self.config.ratio.values() if isinstance(self.config.ratio, dict) else [self.config.ratio]
        if groups == 0 and any(r > 0 for r in ratios):
            raise ConfigError(
                f"prune: channel pruning would remove no channel of {type(probe.model).__name__} (ratio "
                f"{self.config.ratio}{f', round_to {self.config.round_to}' if self.config.round_to else ''}): every layer it "
                "names is narrower than round_to or keeps all its channels at that ratio; raise the ratio or lower round_to")
        base = architecture.build(architecture.record(probe.arch["base"]), probe.trust, "prune")
        arch = architecture.record(probe.arch["base"], architecture.diff_edits(base, model))
        return probe.evolve(model=model, arch=arch)

    def _run_channels(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        ckpt = source.checkpoint()
        model = ckpt.build(ctx.trust)
        apply_masks(model, ckpt.masks)  # pruned weights are exactly zero, so importance sees them as such
        search = None
        if self.budgeted:
            model, report, masks, search = self._budgeted_channels(model, dict(ckpt.masks), ctx)
        else:
            report, _, masks = self._prune_channels(model, ctx.data, ctx.seed, dict(ckpt.masks),
                                                    retrain_with=ctx.console)
        pruned = ckpt.with_model(model, ctx.trust)
        pruned.masks = masks  # sliced with their weights (with_model would drop them)
        if self.config.steps > 1 or (search or {}).get("chosen") is not None:
            pruned.codebooks = {}  # retraining between steps (or the recovery) moved the weights off their shared values
        pruned.save(out_dir / CHECKPOINT_FILE)
        info = {**compressed_model_info(model, pruned, ctx.data), "channels": report}
        return info if search is None else {**info, "ratio_search": search}

    def _budgeted_channels(self, model: nn.Module, masks: dict[str, torch.Tensor], ctx: StageContext):
        """(model, report, masks, record): the largest of CHANNEL_RATIOS whose model after the rounds and
        a recovery stays within the prune's allowance counted from the trained reference (and, for
        classification, within the confidence guard, as for budgeted weight pruning); the model
        unpruned when none does."""
        baseline = stage_baseline(model, ctx, "prune")
        share = baseline.allowance

        def trial(ratio: float):
            candidate = copy.deepcopy(model)
            report, _, got = self._prune_channels(candidate, ctx.data, ctx.seed, dict(masks), retrain_with=ctx.console,
                                                  ratio=ratio, recover=True)
            return {"ratio": ratio, **baseline.judge(candidate, CONFIDENCE_GUARD_PT)}, (candidate, report, got)

        index, best, tried = search_level([{"ratio": r} for r in CHANNEL_RATIOS], trial, key="ratio")
        if best is None:
            report, _, masks = self._prune_channels(model, ctx.data, ctx.seed, masks, ratio=0.0)
            best = (model, report, masks)
        chosen = None if index is None else CHANNEL_RATIOS[index]
        ctx.console.print(f"{self.id}: channel ratio within {share:.2g} pt of the trained model after recovery: "
                          f"{chosen if chosen is not None else 'none (no ratio recovered within the budget)'}")
        record = {"share_pt": share, "reference_val": baseline.reference, "ratios": list(CHANNEL_RATIOS), "trials": tried,
                  "chosen": chosen,
                  "recovery": {"rounds": self.config.steps, "epochs_per_round": self.config.retrain.epochs}}
        return (*best, record)

    def _prune_channels(self, model: nn.Module, data: Dataset, seed: int, masks: dict[str, torch.Tensor], *,
                        retrain_with=None, taylor_samples: int | None = None, ratio=None, recover: bool = False
                        ) -> tuple[dict[str, Any], int, dict[str, torch.Tensor]]:
        """Prune ``model`` in place over ``steps`` rounds at ``ratio`` (default: the configured one);
        with ``retrain_with`` (a console) it is retrained between rounds, masks fixed, and with
        ``recover`` after the last one too (at plan time it is not). Returns the report, how many
        channel groups lost channels and the masks sliced to the new shapes."""
        cfg = self.config
        example = torch.from_numpy(data.to_input(data.x_train[:2]))
        widths, cost = channel_widths(model), model_cost(model, example)
        pruner = ChannelPruner(model, example, self._channel_spec(ratio), steps=cfg.steps, schedule=cfg.schedule,
                               masks=masks, setting="prune.ratio")
        groups = 0
        for step in range(cfg.steps):
            if cfg.importance == "taylor":
                self._gradients(model, data, seed + step, taylor_samples or cfg.taylor_samples)
            groups += pruner.step()
            if retrain_with is not None and (step < cfg.steps - 1 or recover):
                with MaskEnforcer(model, pruner.masks) as enforcer:
                    fit(model, data, cfg.retrain, seed + step, retrain_with, label=f"{self.id} {step + 1}/{cfg.steps}",
                        after_step=enforcer.reapply)
        return channel_report(widths, model, cost, example), groups, pruner.masks

    def _gradients(self, model: nn.Module, data: Dataset, seed: int, samples: int) -> None:
        """Loss gradients on a fixed random sample of the train split (Taylor importance)."""
        from ..objectives import objective_for

        objective = objective_for(data)
        idx = np.sort(np.random.default_rng(seed).permutation(len(data.x_train))[:samples])
        x = torch.from_numpy(data.to_input(data.x_train[idx]))
        y = torch.from_numpy(objective.train_targets(data)[idx])
        size = self.config.retrain.batch_size
        accumulate_gradients(model, [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)], objective.loss)


def _shown(sparsity: dict[str, float]) -> str:
    return ", ".join(f"{name or 'model'} {value:.0%}" for name, value in sparsity.items())


def _at(final: float, fraction: float, cfg: PruneConfig) -> float:
    """The schedule's target at ``fraction`` of the rounds (Zhu & Gupta cubic by default)."""
    return sparsity_schedule(final, cfg.steps, kind=cfg.schedule)[round(fraction * cfg.steps) - 1]
