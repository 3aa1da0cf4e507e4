"""prune: magnitude pruning (Han et al.), one shot or iterative (prune, retrain, prune harder).

Masks are stored in the checkpoint and enforced by every later stage, so a pruned weight stays
exactly zero through retraining, weight sharing and export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from edgec.errors import ConfigError

from .artifact import CHECKPOINT_FILE, Artifact
from .compression_info import compressed_model_info
from .pruning import GlobalSparsity, LayerSparsity, MaskEnforcer, ThresholdPruning, compute_masks, sparsity_schedule
from .stage import Stage, StageConfig, StageContext
from .training import OptimConfig, fit


class PruneConfig(StageConfig):
    mode: Literal["threshold", "layer", "global"] = Field(
        "layer", description="threshold: |w| >= quality*std per layer (Han); layer: target sparsity per layer name/type; global: one threshold"
    )
    quality: float | dict[str, float] = Field(1.0, description="threshold mode: quality for all layers or per layer name/type")
    sparsity: float | dict[str, float] = Field(
        default_factory=lambda: {"conv": 0.5, "linear": 0.8}, description="layer/global modes: target fraction of zeros (all layers, or per name/type)")
    steps: int = Field(3, ge=1, description="pruning rounds; between rounds the model is retrained with masks fixed")
    schedule: Literal["cubic", "linear"] = "cubic"
    retrain: OptimConfig = Field(OptimConfig(epochs=3, patience=3), description="training between rounds")


class PruneStage(Stage):
    name = "prune"
    version = 1
    Config = PruneConfig

    def _spec(self, fraction: float):
        """The pruning rule for one round; ``fraction`` of the way (0..1] through the schedule."""
        cfg = self.config
        if cfg.mode == "threshold":
            return ThresholdPruning(cfg.quality)
        if cfg.mode == "global":
            if isinstance(cfg.sparsity, dict):
                raise ConfigError("prune.sparsity: global mode takes one number, not a per-layer table")
            return GlobalSparsity(_at(cfg.sparsity, fraction, cfg))
        targets = cfg.sparsity if isinstance(cfg.sparsity, dict) else {"conv": cfg.sparsity, "linear": cfg.sparsity}
        return LayerSparsity({k: _at(v, fraction, cfg) for k, v in targets.items()})

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        ckpt = source.checkpoint()
        model = ckpt.build()
        masks = dict(ckpt.masks)
        cfg = self.config
        for step in range(cfg.steps):
            masks = compute_masks(model, self._spec((step + 1) / cfg.steps), existing_masks=masks)
            with MaskEnforcer(model, masks) as enforcer:
                if step < cfg.steps - 1:
                    fit(model, ctx.data, cfg.retrain, ctx.seed + step, ctx.console,
                        label=f"prune {step + 1}/{cfg.steps}", after_step=enforcer.reapply)
        ckpt.state_dict, ckpt.masks = model.state_dict(), masks
        ckpt.save(out_dir / CHECKPOINT_FILE)
        return compressed_model_info(model, ckpt, ctx.data)


def _at(final: float, fraction: float, cfg: PruneConfig) -> float:
    """The schedule's target at ``fraction`` of the rounds (Zhu & Gupta cubic by default)."""
    return sparsity_schedule(final, cfg.steps, kind=cfg.schedule)[round(fraction * cfg.steps) - 1]
