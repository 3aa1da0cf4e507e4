"""Selective mixed precision: when an int8 model misses the export parity gate, keep the ops that
add the most int8 error in float, and ship int8 with those few float ops instead of refusing.

Greedy on the int8 diagnosis (``diagnose.int8_layer_errors``: per-layer error against float
activations, worst first by the error each layer adds). Each round diagnoses the file of the last
attempt, adds its worst layers that are not float yet (1, then 1, 2, 4 more: 1, 2, 4, 8 float
layers in all), converts again and lets the gate judge. Re-diagnosing matters: once a layer's
output is float, the error of a quantized tensor further on, which the first diagnosis ranked
below it, becomes the worst. The converters keep a layer's output tensor float, so the layer and
the ops reading its output run in float32 (``float_ops_pt2e``, ``float_ops_onnx``); the file's
inputs and outputs stay int8 (TFLite) or float (ONNX QDQ) as in pure int8. An attempt the
converter fails on ends the search.

AIMET AutoQuant and Intel Neural Compressor fall back op by op the same way. Int16 activations
(16x8) are not tried (not implemented).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgec.base.errors import ExportError
from edgec.ondevice.manifest import LAYER_NAME

MAX_ROUNDS = 4  # 1, 2, 4, 8 float layers


@dataclass
class MixedPrecision:
    """The search's outcome: ``float_layers`` of the passing attempt (None: none passed), every
    attempt's requested layers, and the passing attempt's converter result (exported, outputs)."""

    float_layers: list[str] | None
    attempts: list[list[str]] = field(default_factory=list)
    result: Any = None

    def describe(self) -> str:
        """What was tried, for a refusal: 'int8 with 1, 2, 4 of the worst layers in float (a, b, c, d)'."""
        if not self.attempts:
            return "mixed precision (no int8 layer could be ranked)"
        counts = ", ".join(str(len(a)) for a in self.attempts)
        return f"int8 with {counts} of the worst layers in float ({', '.join(self.attempts[-1])})"

    def record(self, exported) -> dict[str, Any]:
        """build.json's and the manifest's ``mixed_precision``: the layers whose outputs stay float
        (the converter's ``float_layers``: those asked for and the ops reading their outputs)."""
        float_ops = exported.conversion.get("float_layers") or self.float_layers or []
        return {"float_ops": [name for name in float_ops if LAYER_NAME.fullmatch(name)],
                "worst_layers": list(self.float_layers or [])}


def keep_worst_layers_float(
    convert: Callable[[list[str]], Any],
    passes: Callable[[Any], bool],
    rank: Callable[[], list[str]],
) -> MixedPrecision:
    """Greedy search (see the module docstring).

    ``convert(layers)``: writes the int8 file with ``layers`` kept float, returns what ``passes``
    judges (and what is handed back as ``result``); ``rank()``: the layers of the file as it is
    now, worst first.
    """
    chosen: list[str] = []
    search = MixedPrecision(None)
    while len(search.attempts) < MAX_ROUNDS:
        new = [name for name in rank() if name not in chosen][: max(1, len(chosen))]
        if not new:
            break
        chosen = chosen + new
        search.attempts.append(list(chosen))
        try:
            result = convert(list(chosen))
        except ExportError:  # the converter cannot make this float island: the gate's refusal stands
            break
        if passes(result):
            search.float_layers, search.result = list(chosen), result
            break
    return search


def ranked_int8_layers(model: torch.nn.Module, path: Path, calibration: np.ndarray) -> list[str]:
    """The layers of the int8 file at ``path`` that add error, worst first (empty when the diagnosis fails)."""
    from .diagnose import int8_layer_errors

    try:
        layers = int8_layer_errors(model, path, calibration)
    except Exception:  # the diagnosis guides the search; a failure ends it, the gate's refusal stands
        return []
    # only names a manifest can carry (edgec.ondevice.manifest checks them on the device)
    return [layer["name"] for layer in layers
            if layer["name"] != "input" and layer["added_error"] > 0 and LAYER_NAME.fullmatch(layer["name"])]


def mixed_precision(target, model: torch.nn.Module, path: Path, calibration: np.ndarray, tried: list[str],
                    convert: Callable[[list[str]], Any], passes: Callable[[Any], bool]) -> MixedPrecision | None:
    """The export stage's entry point, for an int8 model that missed the gate: the passing search
    (its ``result`` is ``convert``'s), or None when the target forbids float ops or no attempt
    passes; ``tried`` gets one entry saying which."""
    if not target.allow_mixed_precision:
        tried.append(f"no mixed precision (target {target.name!r} sets allow_mixed_precision = false; true lets "
                     "int8 keep its worst layers in float)")
        return None
    search = keep_worst_layers_float(convert, passes, lambda: ranked_int8_layers(model, path, calibration))
    if search.float_layers is None:
        tried.append(search.describe())
        return None
    return search
