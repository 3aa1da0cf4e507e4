"""pretrain: greedy layer-wise denoising-autoencoder pretraining of an MLP's hidden layers (Vincent
et al. 2008 / 2010; see ``algorithms/denoising.py``). List it before ``train``, which fine-tunes the
whole network from these weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from edgec.base.errors import ConfigError

from ..algorithms.denoising import (decode_to_input, encode, gradient_norms, hidden_stack, reconstruction_loss,
                                    train_layer)
from ..artifact import CHECKPOINT_FILE, Artifact
from ..modelinfo import model_info
from ..stage import Probe, StageConfig, StageContext
from ..training import TrainingStage, resolve_device, seed_everything

RECONSTRUCTIONS_FILE = "reconstructions.npz"  # a few validation samples and each layer's reconstruction, for the report
SHOWN_SAMPLES = 8


class PretrainConfig(StageConfig):
    epochs: int = Field(5, ge=1, description="epochs per hidden layer")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    noise: Literal["mask", "gaussian"] = Field("mask", description="mask: zero a fraction of the inputs; gaussian: add N(0, level^2)")
    level: float = Field(0.25, ge=0, le=10, description="mask: the fraction zeroed (< 1); gaussian: the standard deviation")


class PretrainStage(TrainingStage):
    kind = "pretrain"
    version = 1
    Config = PretrainConfig

    @classmethod
    def report_section(cls, doc, summary, manifest) -> None:
        from edgec.report.pretrain import pretrain_section

        pretrain_section(doc, summary)

    def _device(self) -> str:
        return resolve_device("cpu")  # small dense layers: the CPU is fast enough and results stay comparable

    def check(self, probe: Probe) -> Probe:
        super().check(probe)
        if self.config.noise == "mask" and self.config.level >= 1:
            raise ConfigError(f"level = {self.config.level} would mask every input; use a fraction below 1 (e.g. 0.25)")
        if probe.data.task != "classification":
            raise ConfigError(f"pretrain prepares a classifier's hidden layers, but the data's task is "
                              f"{probe.data.task}; remove the pretrain stage")
        hidden_stack(probe.model, probe.sample())
        return probe

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        cfg, data = self.config, ctx.data
        seed_everything(ctx.seed)
        ckpt = source.checkpoint()
        model = ckpt.build(ctx.trust)
        x_train = torch.from_numpy(data.to_input(data.x_train))
        y_train = torch.from_numpy(data.y_train.astype(np.int64))
        x_val = torch.from_numpy(data.to_input(data.x_val))
        layers = hidden_stack(model, x_train[:2])
        grads_before = gradient_norms(model, layers, x_train, y_train)
        shown, decoders, per_layer = {"input": x_val[:SHOWN_SAMPLES].flatten(1).numpy()}, [], []
        for i, layer in enumerate(layers):
            label = f"{self.id}: layer {i + 1}/{len(layers)} ({layer.name})"
            with ctx.console.status(label) as status:
                losses, decoder = train_layer(
                    layers, i, x_train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, noise=cfg.noise,
                    level=cfg.level, seed=ctx.seed + i,
                    on_epoch=lambda e, loss: status.update(f"{label}: epoch {e + 1}/{cfg.epochs}, loss {loss:.4f}"))
            decoders.append(decoder)
            shown[f"layer{i + 1}"] = decode_to_input(layers, decoders, encode(layers, x_val[:SHOWN_SAMPLES], i + 1)).numpy()
            per_layer.append({"layer": layer.name, "in": layer.module.in_features, "out": layer.module.out_features,
                              "loss": losses, "val_loss": reconstruction_loss(layers, i, decoder, x_val)})
            ctx.console.print(f"  {label}: reconstruction loss {losses[0]:.4f} -> {losses[-1]:.4f} "
                              f"(validation, clean: {per_layer[-1]['val_loss']:.4f})")
        grads_after = gradient_norms(model, layers, x_train, y_train)
        model.eval()
        ckpt.state_dict = model.state_dict()
        ckpt.save(out_dir / CHECKPOINT_FILE)
        np.savez_compressed(out_dir / RECONSTRUCTIONS_FILE, image_shape=np.asarray(data.input_shape, np.int64),
                            **{k: v.astype(np.float32) for k, v in shown.items()})
        return {**model_info(model, data), "pretrain": {
            "layers": per_layer, "noise": cfg.noise, "level": cfg.level, "epochs": cfg.epochs,
            "grad_norms": {"layers": [l.name for l in layers], "before": grads_before, "pretrained": grads_after}}}
