"""Widen an int8 model's output quantization so that it covers a given range of values.

An autoencoder's output must be able to reproduce its input: the int8 range of its output tensor
has to cover the input range. Calibration observes the outputs on the calibration samples, and
the TFLite PT2E histogram observer (which minimizes the L2 quantization error) clips the rare
bright values of a mostly dark image: an MNIST autoencoder came out able to emit [-0.19, 0.51] for
inputs in [0, 1]. This module rewrites the output's quantization parameters after conversion.

That is exact, not an approximation: the int8 kernels that compute a tensor (FULLY_CONNECTED,
CONV_2D, ADD, QUANTIZE, ...) derive their requantization multiplier from the output tensor's scale
and zero point when the interpreter prepares them, and ONNX Runtime fuses a QDQ graph from its
QuantizeLinear / DequantizeLinear parameters; so a wider output range only costs resolution (a
larger step), it does not change what the layers compute. Ops that only move bytes (RESHAPE,
TRANSPOSE, ...) between the computing op and the graph output must keep one scale: the whole chain
is rewritten.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# TFLite int8 ops whose output must share their input's quantization (bytes moved, not computed)
_TFLITE_SAME_SCALE = {"RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "SLICE", "STRIDED_SLICE", "MAX_POOL_2D",
                      "RESIZE_NEAREST_NEIGHBOR", "PAD"}
# TFLite int8 ops whose output quantization is fixed by the kernel (LOGISTIC: 1/256, -128): never rewritten
_TFLITE_FIXED_RANGE = {"LOGISTIC", "TANH", "SOFTMAX", "LOG_SOFTMAX"}
_ONNX_SAME_SCALE = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Identity"}


def representable(scale: float, zero_point: int, qmin: int = -128, qmax: int = 127) -> tuple[float, float]:
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale


def covering(lo: float, hi: float, qmin: int = -128, qmax: int = 127) -> tuple[float, int]:
    """(scale, zero_point) of the affine int8 quantization of [lo, hi] (0 included, as int8 activations need)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0:
        return 1.0, 0
    scale = float(np.float32((hi - lo) / (qmax - qmin)))
    zero_point = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    while representable(scale, zero_point, qmin, qmax)[1] < hi - scale / 2 or \
            representable(scale, zero_point, qmin, qmax)[0] > lo + scale / 2:  # rounding left an end short
        scale = float(np.float32(scale * 1.001))
        zero_point = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return scale, zero_point


def widen_output(path: Path, fmt: str, output_spec: dict[str, Any], lo: float, hi: float) -> dict[str, Any] | None:
    """Make the int8 output of the model file at ``path`` cover [lo, hi] (never narrowing it).

    ``output_spec``: the manifest's ``outputs[0]`` (its ``quantization`` is updated in place for a
    TFLite int8 output). Returns what was done (for the conversion record), or None when the
    output is float or already covers the range."""
    if fmt == "tflite":
        return _widen_tflite(Path(path), output_spec, lo, hi)
    return _widen_onnx(Path(path), lo, hi)


def _plan(current: tuple[float, float], lo: float, hi: float) -> tuple[float, int] | None:
    c_lo, c_hi = current
    step = (c_hi - c_lo) / 255.0
    if c_lo <= lo + step and c_hi >= hi - step:  # covered to within one step: nothing to gain
        return None
    return covering(min(lo, c_lo), max(hi, c_hi))


def _widen_tflite(path: Path, output_spec: dict[str, Any], lo: float, hi: float) -> dict[str, Any] | None:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    out = graph.tensors[graph.outputs[0]]
    q = out.quantization
    if out.type != schema.TensorType.INT8 or q is None or q.scale is None or len(q.scale) != 1:
        return None
    before = representable(float(q.scale[0]), int(q.zeroPoint[0]))
    plan = _plan(before, lo, hi)
    if plan is None:
        return None
    scale, zero_point = plan
    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    producers = {t: op for op in graph.operators for t in op.outputs}
    chain, tensor = [], graph.outputs[0]
    while True:
        chain.append(tensor)
        op = producers.get(tensor)
        if op is None:
            break
        name = names[flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])]
        if name in _TFLITE_FIXED_RANGE:
            return None  # the kernel demands its own output parameters
        if name not in _TFLITE_SAME_SCALE:
            break
        tensor = op.inputs[0]
    consumers = [t for op in graph.operators for t in op.inputs]
    if any(consumers.count(t) > 1 for t in chain[1:]) or graph.outputs[0] in consumers:
        return None  # a tensor of the chain feeds another op too: its scale is not this chain's alone
    for t in chain:
        tq = graph.tensors[t].quantization
        tq.scale, tq.zeroPoint = np.array([scale], dtype=np.float32), np.array([zero_point], dtype=np.int64)
    _replace(path, lambda tmp: flatbuffer_utils.write_model(model, tmp))
    output_spec["quantization"] = {"scale": scale, "zero_point": zero_point}
    return {"before": list(before), "after": list(representable(scale, zero_point)), "tensors": len(chain)}


def _widen_onnx(path: Path, lo: float, hi: float) -> dict[str, Any] | None:
    """QDQ int8 ONNX: the QuantizeLinear / DequantizeLinear pair in front of the graph output."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    node = producers.get(graph.output[0].name)
    while node is not None and node.op_type in _ONNX_SAME_SCALE:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return None
    quant = producers.get(node.input[0])
    if quant is None or quant.op_type != "QuantizeLinear" or len(node.input) < 3 or len(quant.input) < 3:
        return None
    names = {node.input[1], node.input[2], quant.input[1], quant.input[2]}
    if any(n not in inits for n in names):
        return None
    zp_array = numpy_helper.to_array(inits[node.input[2]])
    if zp_array.size != 1:
        return None
    qmin, qmax = (-128, 127) if zp_array.dtype == np.int8 else (0, 255)
    scale0 = float(numpy_helper.to_array(inits[node.input[1]]).reshape(-1)[0])
    before = representable(scale0, int(zp_array.reshape(-1)[0]), qmin, qmax)
    c_lo, c_hi = before
    step = (c_hi - c_lo) / (qmax - qmin)
    if c_lo <= lo + step and c_hi >= hi - step:
        return None
    scale, zero_point = covering(min(lo, c_lo), max(hi, c_hi), qmin, qmax)
    shared = [n for n in graph.node if n not in (node, quant) and names & set(n.input)]
    if shared:  # the parameters serve other tensors too: leave them alone
        return None
    for name in (node.input[1], quant.input[1]):
        inits[name].CopyFrom(numpy_helper.from_array(np.array(scale, dtype=np.float32).reshape(
            numpy_helper.to_array(inits[name]).shape), name))
    for name in (node.input[2], quant.input[2]):
        inits[name].CopyFrom(numpy_helper.from_array(np.array(zero_point, dtype=zp_array.dtype).reshape(zp_array.shape), name))
    _replace(path, lambda tmp: onnx.save(model, tmp))
    return {"before": list(before), "after": list(representable(scale, zero_point, qmin, qmax)), "tensors": 1}


def _replace(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
