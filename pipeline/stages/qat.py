"""qat: quantization-aware fine-tuning for the int8 exporters (Jacob et al. 2018).

The model trains through fake-quantize modules placed exactly where the int8 converter quantizes
(``edgec.targets.qat``: the TFLite exporter's PT2E quantizer, conv + BatchNorm trained folded);
an int8 export then takes its ranges and scales from this training instead of post-training
calibration, on TFLite and ONNX (QDQ) alike. Compression survives, as in tfmot's sparsity- and
cluster-preserving QAT: pruned weights stay exactly zero (their masks are enforced) and shared
weights train as their centroids, so each layer keeps its codebook.

qat is the last stage before export: its quantization parameters fit the weights it trained.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from edgec.base.errors import ConfigError, ExportError
from edgec.base.quiet import native_logs_captured
from edgec.targets.qat import QATModel, prepare_qat, qat_extension, weight_bits_for

from ..algorithms.pruning import MaskEnforcer
from ..algorithms.sharing import CentroidTrainer, assignments_for
from ..artifact import CHECKPOINT_FILE, Artifact
from ..compression_info import compressed_model_info
from ..extensions import QAT_EXT, TASKS_EXT
from ..stage import Probe, StageConfig, StageContext
from ..training import OptimConfig, TrainingStage, fit


class QatConfig(StageConfig, OptimConfig):
    epochs: int = Field(5, ge=1)
    lr: float = Field(1e-4, gt=0, description="fine-tuning: a tenth of training's rate or less")
    patience: int = Field(5, ge=1)
    per_channel: bool = Field(True, description="one int8 weight scale per output channel (what TFLite's int8 "
                              "kernels and XNNPACK run natively); false: one per weight tensor")


class QatStage(TrainingStage):
    kind = "qat"
    version = 2  # 2: trained on the target's weight grid (7 bits for ONNX: targets/onnx_export.py)
    target_dependent = True
    writes_extensions = (QAT_EXT,)
    Config = QatConfig

    def reached_bundle(self, info: dict[str, Any], reached: list[str]) -> list[str]:
        return [*reached, f"quantization-aware trained ({self.id}: int8 exports use its ranges)"]

    def check(self, probe: Probe) -> Probe:
        super().check(probe)
        if TASKS_EXT in probe.extensions:
            raise ConfigError("qat does not support multi-task models (learn stages) yet; leave it out (export "
                              "calibrates them after training)")
        try:
            with native_logs_captured():
                prepare_qat(probe.model, probe.sample(1), self.config.per_channel, weight_bits_for(probe.target.format))
        except ExportError as e:
            raise ConfigError(f"{e}; leave qat out to export with post-training calibration") from e
        record = {"per_channel": self.config.per_channel, "weight_bits": weight_bits_for(probe.target.format)}
        return probe.evolve(extensions={**probe.extensions, QAT_EXT: record})

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        ckpt = source.checkpoint()
        model = ckpt.build(ctx.trust)
        example = torch.from_numpy(ctx.data.to_input(ctx.data.x_train[:1]))
        bits = weight_bits_for(ctx.target.format)
        with native_logs_captured():
            graph = prepare_qat(model, example, self.config.per_channel, bits)
        trainee = QATModel(graph)
        train = functools.partial(fit, trainee, ctx.data, self.config, ctx.seed, ctx.console, label=self.id)
        if ckpt.codebooks:  # cluster-preserving: train the shared values; pruned weights are in no cluster
            with CentroidTrainer(graph, ckpt.codebooks, assignments_for(graph, ckpt.codebooks)) as trainer:
                result = train(parameters=trainer.parameters(), after_step=trainer.write_back)
                ckpt.codebooks = trainer.codebooks()
        elif ckpt.masks:  # sparsity-preserving
            with MaskEnforcer(graph, ckpt.masks) as enforcer:
                result = train(after_step=enforcer.reapply)
        else:
            result = train()
        model.load_state_dict(trainee.trained_state(model))
        ckpt.state_dict = model.state_dict()
        ckpt.extensions = {**ckpt.extensions, QAT_EXT: qat_extension(graph, self.config.per_channel, bits)}
        ckpt.save(out_dir / CHECKPOINT_FILE)
        return {
            **compressed_model_info(model, ckpt, ctx.data),
            "qat_val_score": result.best_val_accuracy,
            "epochs_run": result.epochs_run,
        }
