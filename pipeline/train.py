"""train: fit the model on the training split with early stopping on validation accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifact import CHECKPOINT_FILE, Artifact
from .modelinfo import model_info
from .stage import Stage, StageContext
from .training import OptimConfig, fit


class TrainConfig(OptimConfig):
    pass


class TrainStage(Stage):
    name = "train"
    version = 1
    Config = TrainConfig

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        ckpt = source.checkpoint()
        model = ckpt.build()
        result = fit(model, ctx.data, self.config, ctx.seed, ctx.console, label="train")
        ckpt.state_dict = model.state_dict()
        ckpt.save(out_dir / CHECKPOINT_FILE)
        return {**model_info(model, ctx.data), "epochs_run": result.epochs_run, "best_epoch": result.best_epoch}
