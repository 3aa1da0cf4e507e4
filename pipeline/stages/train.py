"""train: fit the model on the training split with early stopping on validation accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifact import CHECKPOINT_FILE, Artifact
from ..objectives import check_model_outputs
from ..modelinfo import model_info
from ..stage import Probe, StageConfig, StageContext
from ..training import OptimConfig, TrainingStage, fit


class TrainConfig(StageConfig, OptimConfig):
    pass


class TrainStage(TrainingStage):
    kind = "train"
    version = 1
    Config = TrainConfig

    def check(self, probe: Probe) -> Probe:
        super().check(probe)
        check_model_outputs(probe)  # classification: outputs match the classes
        return probe

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        ckpt = source.checkpoint()
        model = ckpt.build(ctx.trust)
        result = fit(model, ctx.data, self.config, ctx.seed, ctx.console, label=self.id)
        ckpt.state_dict = model.state_dict()
        ckpt.save(out_dir / CHECKPOINT_FILE)
        return {**model_info(model, ctx.data), "epochs_run": result.epochs_run, "best_epoch": result.best_epoch}
