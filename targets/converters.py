"""The converter registry: one converter per model format, the only place that knows formats apart.

A target profile names a ``format``; :func:`converter_for` gives its converter, which declares

- ``precisions``: what it can write (the export stage checks a target's precision against them);
- ``convert``: the model file at a precision (int8 from calibration samples or a qat stage's state);
- ``runtime``, ``min_runtime_version``, ``recommended``: what the manifest says the device runs;
- ``automatic_remedies``: converter options that cannot make a passing int8 model worse, tried
  when int8 misses the parity gate (the gate re-checks each);
- ``manual_remedies``: the converter's options a refusal may still suggest;
- ``diagnose``: which op adds the most int8 error, for the refusal message.

What a precision implies for the export (calibration, remedies, an fp32 fallback) is
:class:`Precision`'s, not a string comparison. The exporters themselves (``tflite_export``,
``onnx_export``) are imported on first use: litert-torch and onnxruntime take seconds to load.
Adding a format: a :class:`Converter` subclass here, its entry in ``CONVERTERS``, and the module
that writes the file (docs/design.md, "Adding a converter").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgec.base.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """What a precision means to the export, whatever the format.

    ``calibrated``: integer arithmetic whose ranges come from calibration samples (or a qat stage),
    so calibration remedies and the per-layer int8 diagnosis apply. ``lossless``: the torch model's
    own float32 arithmetic: no fp32 fallback file is needed beside it, and a mismatch is a fault of
    the model (nondeterminism), not of the conversion."""

    name: str
    calibrated: bool = False
    lossless: bool = False


PRECISIONS = {p.name: p for p in (Precision("int8", calibrated=True), Precision("fp16"), Precision("fp32", lossless=True))}


class Converter:
    """A model format: how a torch model becomes its file and what the export may do about a mismatch."""

    format: str
    runtime: str  # the on-device runtime's name (edgec/ondevice/runtimes.py), as the manifest records it
    min_runtime_versions: dict[str, str]  # pip package -> the oldest version the bundle is made for
    precisions: tuple[str, ...] = tuple(PRECISIONS)

    def precision(self, name: str) -> Precision:
        """The precision ``name`` as this converter writes it; ConfigError when it does not."""
        if name not in self.precisions:
            raise ConfigError(f"the {self.format} converter writes no {name!r} models (it writes "
                              f"{', '.join(self.precisions)})")
        return PRECISIONS[name]

    def convert(self, model, example, path: Path, *, precision: str, calibration: np.ndarray | None,
                per_channel: bool, calibration_method: str, qat: Mapping[str, Any] | None = None, **options):
        """Write ``model`` to ``path``; returns the ExportedModelInfo. ``options``: a remedy's converter options."""
        raise NotImplementedError

    def automatic_remedies(self, calibration_method: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(what, converter options) to retry int8 with when it misses the gate, the first that passes ships."""
        return iter(())

    def manual_remedies(self, calibration_method: str, tried: list[dict[str, Any]]) -> list[str]:
        """Converter options a refusal may suggest, leaving out those in ``tried`` (converter options)."""
        return []

    def recommended(self, target) -> dict[str, Any]:
        """The runtime settings the bundle recommends until ``edgec bench`` measures better ones."""
        return {"threads": target.threads}

    def diagnose(self, model, path: Path, calibration: np.ndarray) -> str:
        """Which op adds the most int8 error (per-layer comparison with float activations), as the
        start of a refusal message; empty when the diagnosis fails: it must never hide the refusal."""
        from .diagnose import int8_layer_errors

        try:
            layers = int8_layer_errors(model, path, calibration)
        except Exception:
            return ""
        if not layers:
            return ""
        worst = layers[0]
        return (f"the op adding the most int8 error is {worst['name']} ({worst['op']}, relative error "
                f"{worst['relative_error']:.3f}); ")


class TFLiteConverter(Converter):
    format, runtime = "tflite", "tflite"
    # ai-edge-litert: the version the bundle's expected outputs are computed with (its numbering restarted
    # at 1.0 when it forked from tflite-runtime, so one minimum for both packages compared 2.3.0 with 2.14.0)
    min_runtime_versions = {"ai-edge-litert": "2.3.0", "tflite-runtime": "2.14.0"}

    def convert(self, model, example, path, *, precision, calibration, per_channel, calibration_method, qat=None,
                **options):
        from .tflite_export import export_tflite  # onnxruntime's calibration methods do not apply to TFLite

        return export_tflite(model, example, path, precision=precision, calibration=calibration, qat=qat,
                             per_channel=per_channel, **options)

    def automatic_remedies(self, calibration_method):
        yield "minmax activation observer", {"activation_observer": "minmax"}

    def recommended(self, target):
        return {"threads": target.threads, "xnnpack": True}


class OnnxConverter(Converter):
    format, runtime = "onnx", "onnxruntime"
    min_runtime_versions = {"onnxruntime": "1.20.0"}
    CALIBRATION_METHODS = ("percentile", "entropy", "minmax")  # the order remedies try them in

    def convert(self, model, example, path, *, precision, calibration, per_channel, calibration_method, qat=None,
                **options):
        from .onnx_export import export_onnx

        options = {"per_channel": per_channel, "calibration_method": calibration_method, **options}
        return export_onnx(model, example, path, precision=precision, calibration=calibration, qat=qat, **options)

    def automatic_remedies(self, calibration_method):
        for method in self.CALIBRATION_METHODS[:2]:
            if method != calibration_method:
                yield f"{method} calibration", {"calibration_method": method}

    def manual_remedies(self, calibration_method, tried):
        methods = {calibration_method} | {o["calibration_method"] for o in tried if "calibration_method" in o}
        untried = [m for m in self.CALIBRATION_METHODS if m not in methods]
        return [f"another calibration method (--set export.calibration.method={untried[0]})"] if untried else []

    def recommended(self, target):
        return {"threads": target.threads, "provider": target.providers[0], "graph_optimization_level": "all"}


CONVERTERS: dict[str, Converter] = {c.format: c for c in (TFLiteConverter(), OnnxConverter())}
FORMATS = tuple(CONVERTERS)


def converter_for(fmt: str) -> Converter:
    """The converter of model format ``fmt``; a one-line ConfigError naming the formats for an unknown one."""
    converter = CONVERTERS.get(fmt)
    if converter is None:
        raise ConfigError(f"unknown model format {fmt!r}: edgec converts to {', '.join(FORMATS)}")
    return converter
