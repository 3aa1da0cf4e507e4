"""What the exporters share: the record of an exported file, staged writing, quiet converters."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import ExportError

# Layout of a model input/output by rank. Both converters keep PyTorch's NCHW at the interface
# (litert-torch transposes to NHWC inside the graph), so a 4-D tensor is NCHW in every format.
_LAYOUT_BY_RANK = {2: "NC", 4: "NCHW"}


@dataclass(frozen=True)
class ExportedModelInfo:
    """An exported model file and its I/O tensors as the runtime reads them back from the file.

    ``inputs`` / ``outputs``: one dict per tensor, in the manifest's schema:
    ``name``, ``shape`` (ints; -1 marks a dynamic dimension), ``dtype`` ("float32" | "float16" |
    "int8"), ``layout`` ("NCHW" | "NHWC" | "NC"), ``quantization`` ({"scale", "zero_point"} for
    an int8 tensor, else None). ``conversion`` says how the file was made (tool, settings,
    calibration digest) for the bundle's lineage.
    """

    path: Path
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    runtime_versions: dict[str, str]
    conversion: dict[str, Any] = field(default_factory=dict)


def tensor_spec(
    name: str, shape: list[int], dtype: str, quantization: dict[str, float | int] | None = None
) -> dict[str, Any]:
    if len(shape) not in _LAYOUT_BY_RANK:
        raise ExportError(
            f"tensor {name!r} has shape {shape}: edgec exports models whose inputs and outputs are "
            "(N, features) or (N, C, H, W)"
        )
    return {
        "name": name,
        "shape": [int(d) for d in shape],
        "dtype": dtype,
        "layout": _LAYOUT_BY_RANK[len(shape)],
        "quantization": quantization,
    }


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    Any older file at ``path`` is removed first, so after a failure there is no file at ``path``
    at all and a stale model can never pass for the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def quiet_converter() -> Iterator[None]:
    """Silence the converters' progress output; errors still propagate as exceptions.

    onnxruntime's calibrators and ai-edge-quantizer ``print`` progress reports, and the
    exporters emit deprecation warnings about their own internals that a user cannot act on.
    """
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def calibration_inputs(calibration: np.ndarray | None, example) -> np.ndarray:
    """The calibration samples as contiguous float32, checked against the batch-1 ``example``."""
    if calibration is None or len(calibration) == 0:
        raise ExportError("int8 export needs calibration samples (float32 model inputs); none were given")
    if tuple(calibration.shape[1:]) != tuple(example.shape[1:]):
        raise ExportError(
            f"calibration samples have shape {list(calibration.shape[1:])} but the model input is "
            f"{list(example.shape[1:])}; preprocess them exactly like the model input"
        )
    samples = np.ascontiguousarray(calibration, dtype=np.float32)
    if not np.isfinite(samples).all():
        raise ExportError("calibration samples contain NaN or infinity")
    return samples
