"""What the exporters share: the record of an exported file, staged writing, quiet converters."""

from __future__ import annotations

import contextlib
import copy
import io
import operator
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgec.base.errors import ExportError

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
    # int8 with some layers kept float (targets/mixed_precision.py): the manifest's ``mixed_precision``
    mixed_precision: dict[str, Any] | None = None


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


# nn modules that are the identity at inference; the converters must not see them.
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# The aten ops torch.export records for dropout (modules and F.dropout & co.), in eval mode too.
DROPOUT_OPS = {
    torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default,
    torch.ops.aten.feature_dropout.default, torch.ops.aten.feature_dropout_.default,
    torch.ops.aten.alpha_dropout.default, torch.ops.aten.alpha_dropout_.default,
    torch.ops.aten.feature_alpha_dropout.default, torch.ops.aten.feature_alpha_dropout_.default,
}


def strip_dropout(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every dropout module replaced by ``nn.Identity``.

    Dropout is the identity at inference, but an eval-mode ``nn.Dropout`` left in front of a Linear
    broke litert-torch's int8 TFLite conversion (pooling -> flatten -> Dropout -> Linear: top-1
    agreement 0.007 in a user's model, 0.41 in tests/fixtures/edge_models.py's ``dropout_head``,
    1.0 without it): the converter drops the dropout and, with it, the requantization between the
    pooling's scale and the Linear's input scale, but quantizes the Linear's int32 bias for the
    input scale that was observed after the dropout (here 4.6x smaller than the one the Linear
    gets), so every logit's bias is off. ``model`` itself is left as it is. Functional dropout
    (``F.dropout(x, p, self.training)``) is not a module: :func:`remove_dropout_nodes` takes it out
    of a captured graph.
    """
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, DROPOUT_MODULES):
                setattr(module, child_name, nn.Identity())
    return model.eval()


def remove_dropout_nodes(graph_module: torch.fx.GraphModule) -> int:
    """Replace every dropout op of a captured (``torch.export``) graph by its input; returns how many.

    ``torch.export`` in eval mode still records ``aten.dropout(x, p, train=False)`` for dropout
    modules and for functional dropout; it computes the identity, so it is removed. A dropout
    recorded with ``train=True`` (``F.dropout(x, training=True)``) is removed too: at inference
    it is the identity by definition, and a randomized reference could not be verified anyway.
    """
    graph, removed = graph_module.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in DROPOUT_OPS:
            node.replace_all_uses_with(node.args[0])
        elif node.target == torch.ops.aten.native_dropout.default:  # (output, mask): keep output = input
            for user in list(node.users):
                if user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(node.args[0])
                    graph.erase_node(user)
            if node.users:
                continue
        else:
            continue
        graph.erase_node(node)
        removed += 1
    if removed:
        graph.lint()
        graph_module.recompile()
    return removed


def dropout_ops(graph_module: torch.fx.GraphModule) -> list[str]:
    """Names of the dropout ops left in a captured graph (an exporter refuses a graph with any)."""
    ops = DROPOUT_OPS | {torch.ops.aten.native_dropout.default}
    return [n.name for n in graph_module.graph.nodes if n.op == "call_function" and n.target in ops]
