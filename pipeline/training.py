"""The training loop shared by every stage that trains (train, retrain, share, distill).

Stages customise it through hooks rather than copies: ``loss_fn`` (distillation), ``after_step``
(keeping pruned weights at zero, writing shared centroids back) and ``parameters`` (train a
subset). Early stopping keeps the weights of the best validation epoch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from edgec.base.data import Dataset

from edgec.base.errors import ConfigError, RunError

from .objectives import objective_for
from .stage import Probe, Stage, StageContext, Strict


class AugmentConfig(Strict):
    """Random small shifts and rotations of training images (ignored for flat features)."""

    enabled: bool = False
    max_shift: float = Field(2.0, ge=0, description="pixels")
    max_rotation: float = Field(10.0, ge=0, le=180, description="degrees")


class OptimConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    patience: int = Field(6, ge=1, description="epochs without validation gain before stopping")
    augment: AugmentConfig = AugmentConfig()


def resolve_device(requested: str) -> str:
    """The device a training stage runs on; part of its cache key (results differ across devices)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = \"cuda\" but no CUDA GPU is available here; use device = \"auto\" or \"cpu\"")
    return "cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu"


class TrainingStage(Stage):
    """A stage that trains (its config has ``device``): the device must exist at plan time, and the
    device it resolves to is part of the cache key (results differ across devices)."""

    def _device(self) -> str:
        return resolve_device(self.config.device)

    def check(self, probe: Probe) -> Probe:
        self._device()
        return probe

    def key_material(self, ctx: StageContext) -> dict:
        return {**super().key_material(ctx), "device": self._device()}


@dataclass
class FitResult:
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Random affine (rotation + translation) per image, via affine_grid (no torchvision here)."""
    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(cfg.max_rotation)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * cfg.max_shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0] * 2 / w], 1), torch.stack([sin, cos, shift[:, 1] * 2 / h], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def fit(
    model: nn.Module,
    data: Dataset,
    cfg: OptimConfig,
    seed: int,
    console: Console,
    *,
    label: str,
    loss_fn: LossFn | None = None,
    after_step: Callable[[], None] | None = None,
    parameters: Iterable[nn.Parameter] | None = None,
) -> FitResult:
    """Train ``model`` in place; on return it holds the best-validation weights, on the CPU.

    A non-finite loss stops training with an error instead of caching a NaN model."""
    gen = seed_everything(seed)
    device = torch.device(resolve_device(cfg.device))
    model.to(device)

    objective = objective_for(data)  # what the task trains on, its loss and early-stopping score
    x_train = torch.from_numpy(data.to_input(data.x_train)).to(device)
    y_train = torch.from_numpy(objective.train_targets(data)).to(device)
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
        if cfg.schedule == "cosine"
        else None
    )
    loss_fn = loss_fn or objective.loss
    use_augment = cfg.augment.enabled and data.is_image and objective.augment

    best = (objective.initial_best, 0, copy.deepcopy(model.state_dict()))
    epochs_run = 0
    with Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs  loss {task.fields[loss]:.4f}  val " + objective.val_name + " {task.fields[val]:.4f}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(label, total=cfg.epochs, loss=float("nan"), val=float("nan"))
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=gen).to(device)
            total, count = 0.0, 0
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                if len(idx) == 1 and len(order) > 1 and _has_batchnorm(model):
                    continue  # BatchNorm cannot train on a batch of one sample; it is reshuffled next epoch
                xb, yb = x_train[idx], y_train[idx]
                if use_augment:
                    xb = augment(xb.cpu(), cfg.augment, gen).to(device)
                xb = objective.train_inputs(xb, gen)  # denoising autoencoders: noisy input, clean target
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), xb, yb)
                if not torch.isfinite(loss):
                    raise RunError(
                        f"{label}: the training loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate "
                        f"(lr = {cfg.lr}) or check the data for extreme values"
                    )
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step()
                if sched is not None:
                    sched.step()
                total += loss.item() * len(idx)
                count += len(idx)
            val = objective.val_score(model, data)
            epochs_run = epoch + 1
            if val > best[0]:
                best = (val, epoch, copy.deepcopy(model.state_dict()))
            progress.update(task, advance=1, loss=total / count, val=objective.shown(val))
            if epoch - best[1] >= cfg.patience:
                break
    model.load_state_dict(best[2])
    model.to("cpu").eval()
    return FitResult(best_val_accuracy=best[0], best_epoch=best[1] + 1, epochs_run=epochs_run)


def _has_batchnorm(model: nn.Module) -> bool:
    """BatchNorm modules, or batch-norm ops of a captured graph (the qat stage trains one)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        or (isinstance(m, torch.fx.GraphModule) and any("batch_norm" in str(n.target) for n in m.graph.nodes))
        for m in model.modules()
    )
