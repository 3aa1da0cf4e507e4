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

from edgec.data import Dataset

from .stage import StageConfig


class AugmentConfig(StageConfig):
    """Random small shifts and rotations of training images (ignored for flat features)."""

    enabled: bool = False
    max_shift: float = Field(2.0, ge=0, description="pixels")
    max_rotation: float = Field(10.0, ge=0, le=180, description="degrees")


class OptimConfig(StageConfig):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    patience: int = Field(6, ge=1, description="epochs without validation gain before stopping")
    augment: AugmentConfig = AugmentConfig()


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


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray | torch.Tensor, data: Dataset, batch_size: int = 1024) -> torch.Tensor:
    """Logits for raw samples ``x`` (preprocessed here), in eval mode."""
    was_training = model.training
    model.eval()
    inputs = torch.from_numpy(data.to_input(np.asarray(x)))
    out = torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, data: Dataset) -> float:
    return float((predict(model, x, data).argmax(1).numpy() == y).mean())


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
    """Train ``model`` in place; on return it holds the best-validation weights."""
    gen = seed_everything(seed)
    x_train = torch.from_numpy(data.to_input(data.x_train))
    y_train = torch.from_numpy(data.y_train)
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
    loss_fn = loss_fn or (lambda logits, x, y: F.cross_entropy(logits, y))
    use_augment = cfg.augment.enabled and data.is_image

    best = (-1.0, 0, copy.deepcopy(model.state_dict()))
    epochs_run = 0
    with Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs  loss {task.fields[loss]:.4f}  val acc {task.fields[val]:.4f}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(label, total=cfg.epochs, loss=float("nan"), val=float("nan"))
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=gen)
            total, count = 0.0, 0
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                xb, yb = x_train[idx], y_train[idx]
                if use_augment:
                    xb = augment(xb, cfg.augment, gen)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), xb, yb)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step()
                if sched is not None:
                    sched.step()
                total += loss.item() * len(idx)
                count += len(idx)
            val = accuracy(model, data.x_val, data.y_val, data)
            epochs_run = epoch + 1
            if val > best[0]:
                best = (val, epoch, copy.deepcopy(model.state_dict()))
            progress.update(task, advance=1, loss=total / count, val=val)
            if epoch - best[1] >= cfg.patience:
                break
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(best_val_accuracy=best[0], best_epoch=best[1] + 1, epochs_run=epochs_run)
