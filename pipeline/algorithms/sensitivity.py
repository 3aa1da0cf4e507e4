"""Per-layer pruning sensitivity (Han et al. 2015, fig. 6): how much validation metric each layer
loses when it alone is pruned to a given sparsity, without retraining; and the sparsities that
spend a share of the accuracy budget.

Each layer gets the highest candidate sparsity whose drop stays within ``SAFETY`` of the share
(the layers' drops add up when they are pruned together); then all layers are pruned together and,
while the joint drop exceeds the share, every layer backs off one candidate.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from .pruning import LayerSparsity, compute_masks, prunable_layers, weight_name

CANDIDATES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
SAFETY = 0.5  # one layer may spend this fraction of the stage's share


def budgeted_sparsities(model: nn.Module, masks: Mapping[str, torch.Tensor], share_pt: float,
                        drop_of: Callable[[nn.Module], float]) -> tuple[dict[str, float], dict[str, Any]]:
    """({module name: sparsity} for the layers worth pruning, the record of how it was chosen).
    ``drop_of(model)`` is the validation drop in points against the unpruned model."""
    curves = {}
    for name in prunable_layers(model):
        curves[name] = [{"sparsity": s, "drop_pt": round(_pruned_drop(model, masks, {name: s}, drop_of), 4)}
                        for s in CANDIDATES]
    levels = {name: _safe_level(curve, SAFETY * share_pt) for name, curve in curves.items()}
    joint = None
    while True:
        chosen = {name: CANDIDATES[k - 1] for name, k in levels.items() if k > 0}
        joint = _pruned_drop(model, masks, chosen, drop_of) if chosen else 0.0
        if joint <= share_pt + 1e-9 or not chosen:
            break
        levels = {name: max(k - 1, 0) for name, k in levels.items()}  # back off every layer one candidate
    record = {"share_pt": share_pt, "safety": SAFETY, "candidates": list(CANDIDATES), "curves": curves,
              "chosen": chosen, "joint_drop_pt": round(joint, 4)}
    return chosen, record


def _safe_level(curve: list[dict[str, Any]], allowance: float) -> int:
    """How many candidates, from the lowest, stay within ``allowance``: the first one over it ends the
    run (a lucky dip further up a noisy curve is not a safe point)."""
    level = 0
    for point in curve:
        if point["drop_pt"] > allowance + 1e-9:
            break
        level += 1
    return level


@torch.no_grad()
def _pruned_drop(model: nn.Module, masks: Mapping[str, torch.Tensor], sparsity: dict[str, float],
                 drop_of: Callable[[nn.Module], float]) -> float:
    """The drop with ``sparsity`` applied on top of ``masks``; the model's weights are restored."""
    params = dict(model.named_parameters())
    new = compute_masks(model, LayerSparsity(sparsity), existing_masks=masks)
    saved = {}
    for name in sparsity:
        key = weight_name(name)
        saved[key] = params[key].detach().clone()
        params[key].masked_fill_(~new[key], 0.0)
    try:
        return float(drop_of(model))
    finally:
        for key, value in saved.items():
            params[key].copy_(value)
