"""retrain: fine-tune with the pruning masks fixed (pruned weights stay exactly zero)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from .artifact import CHECKPOINT_FILE, Artifact
from .compression_info import compressed_model_info
from .pruning import MaskEnforcer
from .stage import Stage, StageContext
from .training import OptimConfig, fit


class RetrainConfig(OptimConfig):
    epochs: int = Field(15, ge=1)
    lr: float = Field(1e-3, gt=0)


class RetrainStage(Stage):
    name = "retrain"
    version = 1
    Config = RetrainConfig

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        ckpt = source.checkpoint()
        model = ckpt.build()
        with MaskEnforcer(model, ckpt.masks) as enforcer:
            result = fit(model, ctx.data, self.config, ctx.seed, ctx.console, label="retrain", after_step=enforcer.reapply)
        ckpt.state_dict = model.state_dict()
        ckpt.save(out_dir / CHECKPOINT_FILE)
        return {**compressed_model_info(model, ckpt, ctx.data), "epochs_run": result.epochs_run}
