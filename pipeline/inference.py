"""A model's outputs and accuracy on raw samples (below both the training loop and the objectives,
which use them)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgec.base.data import Dataset


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray | torch.Tensor, data: Dataset, batch_size: int = 1024) -> torch.Tensor:
    """Logits for raw samples ``x`` (preprocessed here), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    inputs = torch.from_numpy(data.to_input(np.asarray(x)))
    out = torch.cat([model(inputs[i : i + batch_size].to(device)).cpu() for i in range(0, len(inputs), batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, data: Dataset) -> float:
    return float((predict(model, x, data).argmax(1).numpy() == y).mean())
