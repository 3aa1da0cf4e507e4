"""Budgeted weight sharing: bits per layer by validation sensitivity (layer-wise, as AIMET / HAWQ allocate).

1. Sensitivity: each layer alone is shared at each of ``BITS`` (no fine-tuning, the other layers
   untouched) and the validation drop recorded (the layer's *curve*).
2. Levels: for a tolerance t (points of one-shot drop, ``TOLERANCES``) every layer takes the fewest
   bits, counting down from 8, whose drop stays within t (the first width over t ends the run, as
   for pruning: a lucky dip further down a noisy curve is not a safe point). Level 0 is 8 bits
   everywhere; identical allocations are merged, so each level has no layer wider than the one
   before and fewer bits in all.
3. Search: ``sensitivity.search_level`` keeps the largest level whose drop *after* the stage's
   centroid fine-tuning stays within the share's allowance (counted from the trained model) and,
   for classification, whose mean probability of the true class on validation fell at most
   ``CONFIDENCE_GUARD_PT`` below the incoming model's. Accuracy alone spent on 144 validation
   samples what the prune had gained there: the quick start shipped 3/2/2 bits at -0.7 pt on
   validation and -2.5 pt on test.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .pruning import prunable_layers
from .sharing import cluster_layer, shared_values

BITS = (8, 7, 6, 5, 4, 3, 2)
TOLERANCES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 100.0)
CONFIDENCE_GUARD_PT = 2.0

Curves = dict[str, list[dict[str, float]]]


@torch.no_grad()
def bit_curves(model: nn.Module, drop_of: Callable[[nn.Module], float]) -> Curves:
    """{module name: [{bits, drop_pt}] for each of BITS}; ``drop_of(model)`` is the validation drop in
    points against the unshared model. The model's weights are restored."""
    curves: Curves = {}
    for name, (_, weight) in prunable_layers(model).items():
        saved = weight.detach().clone()
        curve = []
        try:
            for bits in BITS:
                codebook, index = cluster_layer(saved, bits)
                weight.copy_(shared_values(codebook, index, weight.dtype))
                curve.append({"bits": bits, "drop_pt": round(float(drop_of(model)), 4)})
        finally:
            weight.copy_(saved)
        curves[name] = curve
    return curves


def bit_levels(curves: Curves) -> list[dict[str, Any]]:
    """[{tolerance_pt, bits: {module name: bits}}], from 8 bits everywhere to the fewest bits."""
    levels = [{"tolerance_pt": None, "bits": {name: BITS[0] for name in curves}}]
    for tolerance in TOLERANCES:
        chosen = {}
        for name, curve in curves.items():
            bits = BITS[0]
            for point in curve:
                if point["drop_pt"] > tolerance + 1e-9:
                    break
                bits = int(point["bits"])
            chosen[name] = bits
        if chosen != levels[-1]["bits"]:
            levels.append({"tolerance_pt": tolerance, "bits": chosen})
    return levels

