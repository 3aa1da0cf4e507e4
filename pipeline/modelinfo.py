"""Figures recorded for every model a stage produces (the build table and report read them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgec.base.data import Dataset

from .inference import accuracy


def model_info(model: nn.Module, data: Dataset) -> dict[str, Any]:
    """Accuracy on the test and validation splits, parameters, non-zeros and dense fp32 bytes."""
    params = [p.detach() for p in model.parameters()]
    n_params = sum(p.numel() for p in params)
    if data.task != "classification":  # regression / reconstruction: the task's figures instead of accuracy
        from .objectives import objective_for

        return {
            **objective_for(data).model_metrics(model),
            "params": n_params,
            "nonzero_params": int(sum(int(torch.count_nonzero(p)) for p in params)),
            "fp32_bytes": 4 * n_params,
        }
    return {
        "accuracy": accuracy(model, data.x_test, data.y_test, data),
        "val_accuracy": accuracy(model, data.x_val, data.y_val, data),
        "params": n_params,
        "nonzero_params": int(sum(int(torch.count_nonzero(p)) for p in params)),
        "fp32_bytes": 4 * n_params,
    }
