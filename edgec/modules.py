"""Modules edgec itself inserts into models (allow-listed in the architecture record)."""

from __future__ import annotations

import torch
from torch import nn


class ConcatHeads(nn.ModuleDict):
    """Several task heads on one input, their outputs concatenated along the class axis.

    One invoke computes every task; the manifest records which output columns belong to which task.
    Replacing a model's output layer with ConcatHeads({"task-a": old_layer, "task-b": new_layer})
    keeps task-a's logits exactly as they were."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.values()], dim=1)
