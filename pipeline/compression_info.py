"""Figures every compression stage records: sparsity per layer and sizes, honestly counted."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgec.base.checkpoint import Checkpoint
from edgec.base.data import Dataset

from .modelinfo import model_info
from .algorithms.pruning import prunable_parameters, sparsity_report
from .algorithms.storage import deep_compression_bytes


def compressed_model_info(model: nn.Module, ckpt: Checkpoint, data: Dataset) -> dict[str, Any]:
    """model_info plus per-layer sparsity, distinct values and the Deep Compression storage estimate.

    No download size: only the exported model's transport payload (``model.<ext>.edgt``) is shipped,
    and the bundle writer measures it (``transport_bytes``)."""
    state = model.state_dict()
    shared = prunable_parameters(model)
    return {
        **model_info(model, data),
        "sparsity": sparsity_report(model, ckpt.masks or None),
        "distinct_values": {name: int(torch.unique(p.detach()[p.detach() != 0]).numel()) for name, p in shared.items()},
        "deep_compression_bytes": deep_compression_bytes(state, ckpt.codebooks)["total"]["bytes"],
    }
