"""Which layer of an int8 model loses the most accuracy: per-layer int8 vs float activations.

:func:`int8_layer_errors` runs the calibration samples through the int8 model (TFLite or ONNX)
and through a float32 export of the same torch model in the same runtime, with every
intermediate tensor kept, and compares each layer's int8 output (dequantized) with the float
output at the same point. A refusal can then name the op where the error comes from.

- TFLite: ai-edge-litert's interpreter with ``experimental_preserve_all_tensors`` and no default
  delegate (XNNPACK would hide the intermediates); the float reference is the fp32 TFLite
  conversion of the same model. litert-torch names each tensor after the torch modules that
  produced it; the int8 conversion fuses a little differently, so op outputs are paired in graph
  order by op type, shape and the torch modules their names list.
- ONNX: onnxruntime with the intermediate tensors added as graph outputs; the float reference
  is the fp32 export after the same ``quant_pre_process`` the int8 export ran, whose tensor
  names ``quantize_static`` keeps: a quantized tensor ``X`` is compared through its
  DequantizeLinear output, i.e. as the next layer sees it.

Errors are cumulative (each int8 layer is fed by int8 layers before it); ``added_error`` is what
a layer adds over the worst of its inputs, the figure the list is sorted by.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from edgec.base.errors import ExportError

from .exported import calibration_inputs, quiet_converter

# A channel whose float activations carry less than this share of the median channel's energy
# (a nearly dead ReLU channel) is measured against that floor, not against ~0.
_CHANNEL_FLOOR = 0.01


def int8_layer_errors(
    model: torch.nn.Module,
    path: str | Path,
    calibration: np.ndarray,
    *,
    max_samples: int = 64,
) -> list[dict]:
    """Per-layer error of the int8 model at ``path`` (``.tflite`` or ``.onnx``) against float.

    ``model`` is the torch model that was exported to ``path``; ``calibration`` (N, ...) float32
    model inputs, preprocessed like the export's (the first ``max_samples`` are used). Returns one
    dict per layer, worst first (by ``added_error``, then ``relative_error``):

    - ``name``: the layer, as a torch module path where the runtime's tensor names give one
      (TFLite: ``features.3.squeeze``), else the ONNX node name (``/features/features.3/squeeze/Conv``);
    - ``op``: the runtime's op type (``CONV_2D``, ``Conv``, ...);
    - ``tensor``: the output tensor's name in the int8 file;
    - ``relative_error``: ||int8 - float|| / ||float|| of the layer's output, computed per channel
      (the axis of size C: 1 in NCHW/NC, the last in TFLite's NHWC) and root-mean-squared over
      channels, so a few huge channels that crush the resolution of the others show up at the
      layer that produces them; channels with almost no float energy are measured against 1% of
      the median channel's;
    - ``added_error``: ``relative_error`` minus the largest ``relative_error`` among the layer's
      inputs (0 for the graph input): the error this layer adds.

    Raises ExportError when the file cannot be read or the float reference cannot be built.
    """
    path = Path(path)
    samples = np.ascontiguousarray(calibration[:max_samples], dtype=np.float32)
    example = torch.from_numpy(samples[:1])
    samples = calibration_inputs(samples, example)  # the exporters below convert an eval-mode copy
    if path.suffix == ".tflite":
        layers = _tflite_layers(model, example, path, samples)
    elif path.suffix == ".onnx":
        layers = _onnx_layers(model, example, path, samples)
    else:
        raise ExportError(f"int8_layer_errors reads .tflite or .onnx files, not {path.name}")
    return _rank(layers)


def _rank(layers: list[dict]) -> list[dict]:
    """Fill in ``added_error`` and sort, worst first.

    ``layers`` are every op of the int8 graph in topological order (the input's quantization
    first), those without a float counterpart with ``relative_error`` None: they pass the error
    of their inputs on.
    """
    error_of: dict[str, float] = {}
    measured = []
    for layer in layers:
        before = max((error_of[t] for t in layer.pop("inputs") if t in error_of), default=0.0)
        if layer["relative_error"] is None:
            error_of[layer["tensor"]] = before
            continue
        error_of[layer["tensor"]] = layer["relative_error"]
        layer["added_error"] = layer["relative_error"] - before
        measured.append(layer)
    return sorted(measured, key=lambda e: (-e["added_error"], -e["relative_error"]))


class _ErrorMeter:
    """Accumulates per-channel squared error and energy of one tensor over samples."""

    def __init__(self, channel_axis: int):
        self.axis, self.error, self.energy = channel_axis, None, None

    def add(self, quantized: np.ndarray, reference: np.ndarray) -> None:
        axes = tuple(i for i in range(reference.ndim) if i != self.axis % reference.ndim)
        diff = quantized.astype(np.float64) - reference.astype(np.float64)
        error, energy = (diff**2).sum(axis=axes), (reference.astype(np.float64) ** 2).sum(axis=axes)
        self.error = error if self.error is None else self.error + error
        self.energy = energy if self.energy is None else self.energy + energy

    def relative_error(self) -> float:
        floor = _CHANNEL_FLOOR * float(np.median(self.energy))
        if floor == 0.0:
            floor = 1e-9 * float(self.energy.max())
        if floor == 0.0:  # an all-zero reference: report the error's size, not a ratio
            return float(np.sqrt(self.error.mean()))
        return float(np.sqrt(np.mean(self.error / np.maximum(self.energy, floor))))


def _channel_axis(shape: tuple[int, ...], layout: str) -> int:
    if len(shape) == 4:
        return -1 if layout == "NHWC" else 1
    return 1 if len(shape) >= 2 else 0


# ---- TFLite ---------------------------------------------------------------------------------------


def _tflite_layers(model, example, path: Path, samples: np.ndarray) -> list[dict]:
    from .tflite_export import export_tflite

    with tempfile.TemporaryDirectory() as work:
        reference_path = Path(work) / "float.tflite"
        try:
            export_tflite(model, example, reference_path, precision="fp32")
        except ExportError as e:
            raise ExportError(f"int8_layer_errors: the float TFLite reference failed: {e}") from e
        quantized, reference = _TFLiteRun(path), _TFLiteRun(reference_path)
    pairs = _align(quantized, reference)  # int8 tensor index -> float tensor index
    if not pairs:
        raise ExportError(f"int8_layer_errors: no tensor of {path.name} matches the float reference")
    meters = {i: _ErrorMeter(_channel_axis(quantized.shapes[i], "NHWC")) for i in pairs}
    input_meter = _ErrorMeter(_channel_axis(samples.shape, "NCHW"))
    for sample in samples:
        q_values, f_values = quantized.run(sample[None]), reference.run(sample[None])
        for i, j in pairs.items():
            meters[i].add(q_values[i], f_values[j])
        input_meter.add(quantized.quantize_input(sample[None]), sample[None])
    layers = [_input_layer(quantized.names[quantized.input["index"]], input_meter)]
    for op in quantized.ops:
        for i in op["outputs"]:
            layers.append({
                "name": _module_path(quantized.names[i]),
                "op": op["op"],
                "tensor": quantized.names[i],
                "relative_error": meters[i].relative_error() if i in meters else None,
                "inputs": [quantized.names[t] for t in op["inputs"] if t >= 0],
            })
    return layers


def _align(quantized: "_TFLiteRun", reference: "_TFLiteRun") -> dict[int, int]:
    """Pair the op outputs of the int8 and the float file, in graph order.

    Both come from the same torch graph, but the int8 conversion fuses and places ops a little
    differently (an explicit pad kept apart from its conv, a ReLU's location listed first), so
    the tensor names differ. Two outputs pair when their op type and shape are equal and a torch
    module of one name is, or contains, a module of the other; the search keeps graph order.
    """
    candidates = [
        (i, op["op"], reference.shapes[i], _module_paths(reference.names[i]))
        for op in reference.ops if op["op"] not in _TFLITE_UNPAIRED for i in op["outputs"]
    ]
    pairs, start = {}, 0
    for op in quantized.ops:
        if op["op"] in _TFLITE_UNPAIRED:
            continue
        for i in op["outputs"]:
            paths = _module_paths(quantized.names[i])
            for k in range(start, len(candidates)):
                j, kind, shape, other = candidates[k]
                if kind == op["op"] and shape == quantized.shapes[i] and _related(paths, other):
                    pairs[i], start = j, k + 1
                    break
    return pairs


_TFLITE_UNPAIRED = {"QUANTIZE", "DEQUANTIZE", "TRANSPOSE", "RESHAPE"}


def _related(paths: set[str], others: set[str]) -> bool:
    return any(a == b or a.startswith(b + ".") or b.startswith(a + ".") for a in paths for b in others)


def _input_layer(name: str, meter: _ErrorMeter) -> dict:
    """The quantization of the model input, as a layer of its own."""
    return {"name": "input", "op": "QUANTIZE (input)", "tensor": name, "relative_error": meter.relative_error(), "inputs": []}


class _TFLiteRun:
    """A TFLite model whose every op output can be read after a run, dequantized to float32."""

    def __init__(self, path: Path):
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
        from ai_edge_litert.tools import flatbuffer_utils

        try:
            flat = flatbuffer_utils.read_model(str(path))
            self.interpreter = Interpreter(
                model_path=str(path),
                experimental_preserve_all_tensors=True,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
            self.interpreter.allocate_tensors()
        except Exception as e:
            raise ExportError(f"int8_layer_errors: cannot load {path.name}: {type(e).__name__}: {e}") from e
        codes = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
        graph = flat.subgraphs[0]
        self.names = {i: _text(t.name) for i, t in enumerate(graph.tensors)}
        self.shapes = {i: tuple(int(d) for d in (t.shape if t.shape is not None else ())) for i, t in enumerate(graph.tensors)}
        self.ops = [
            {
                "op": codes.get(flat.operatorCodes[op.opcodeIndex].builtinCode, "CUSTOM"),
                "inputs": [int(i) for i in (op.inputs if op.inputs is not None else ())],
                "outputs": [int(i) for i in (op.outputs if op.outputs is not None else ())],
            }
            for op in graph.operators
        ]
        skip = {"QUANTIZE", "DEQUANTIZE"}
        self.op_outputs = [i for op in self.ops if op["op"] not in skip for i in op["outputs"]]
        self.input = self.interpreter.get_input_details()[0]
        self.details = {d["index"]: d for d in self.interpreter.get_tensor_details()}

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """``x`` as the model sees it: quantized to the int8 input and dequantized (float input: as is)."""
        scale, zero_point = self.input["quantization"]
        if self.input["dtype"] != np.int8:
            return x
        return (np.clip(np.round(x / scale) + zero_point, -128, 127) - zero_point) * scale

    def run(self, x: np.ndarray) -> dict[int, np.ndarray]:
        detail = self.input
        if detail["dtype"] == np.int8:
            scale, zero_point = detail["quantization"]
            x = np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)
        self.interpreter.set_tensor(detail["index"], x.astype(detail["dtype"]))
        self.interpreter.invoke()
        values = {}
        for i in self.op_outputs:
            value = self.interpreter.get_tensor(i)
            scale, zero_point = self.details[i]["quantization"]
            values[i] = (value.astype(np.float32) - zero_point) * scale if scale else value.astype(np.float32)
        return values


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def _module_paths(tensor_name: str) -> set[str]:
    """Every torch module path that a litert-torch tensor name lists (see :func:`_module_path`)."""
    return {_module_path(part) for part in tensor_name.split(";") if "/" in part} or {tensor_name}


def _module_path(tensor_name: str) -> str:
    """litert-torch's tensor name -> the torch module path it came from.

    A name lists the locations of the fused torch ops, ``;``-separated; each location is the
    module stack, ``pkg.Class_attr`` per level below the root (``.../Sequential_features/Fire_3/
    Conv2d_squeeze``). The last location is the op's own module (a conv, where a ReLU was fused
    into it): ``features.3.squeeze``.
    """
    locations = [part for part in tensor_name.split(";") if "/" in part]
    if not locations:  # an op of the root module's own forward: name the model class
        root = next((part for part in tensor_name.split(";") if part and not part.isdigit()), tensor_name)
        return root.rsplit(".", 1)[-1] if "." in root else root
    levels = locations[-1].split("/")[1:]
    attrs = [level.rsplit(".", 1)[-1].partition("_")[2] or level for level in levels]
    return ".".join(attrs)


# ---- ONNX -----------------------------------------------------------------------------------------


def _onnx_layers(model, example, path: Path, samples: np.ndarray) -> list[dict]:
    import onnx
    from onnxruntime.quantization import quant_pre_process

    from .onnx_export import INPUT_NAME, _export_fp32

    try:
        quantized = onnx.load(str(path))
    except Exception as e:
        raise ExportError(f"int8_layer_errors: cannot load {path.name}: {type(e).__name__}: {e}") from e
    with tempfile.TemporaryDirectory() as work, quiet_converter():
        fp32, prepared = Path(work) / "fp32.onnx", Path(work) / "prepared.onnx"
        try:
            _export_fp32(model, example, fp32)
            quant_pre_process(fp32, prepared)
        except Exception as e:
            raise ExportError(f"int8_layer_errors: the float ONNX reference failed: {type(e).__name__}: {e}") from e
        reference = onnx.load(str(prepared))

    # In the QDQ model, a quantized tensor X is read by its consumers as DQ(Q(X)).
    producers = {out: node for node in quantized.graph.node for out in node.output}
    seen_as = {}
    for node in quantized.graph.node:
        if node.op_type == "DequantizeLinear":
            q = producers.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                seen_as[q.input[0]] = node.output[0]
    quantized_names = {out for node in quantized.graph.node for out in node.output}
    wanted = {out: seen_as.get(out, out if out in quantized_names else None) for n in reference.graph.node for out in n.output}
    wanted = {f: q for f, q in wanted.items() if q is not None}
    if INPUT_NAME in seen_as:
        wanted[INPUT_NAME] = seen_as[INPUT_NAME]
    if not wanted:
        raise ExportError(f"int8_layer_errors: no tensor of {path.name} matches the float reference")
    f_values = _run_onnx_with_outputs(reference, [t for t in wanted if t != INPUT_NAME], samples, INPUT_NAME)
    f_values[INPUT_NAME] = samples
    q_values = _run_onnx_with_outputs(quantized, list(wanted.values()), samples, INPUT_NAME)

    def error(tensor: str) -> float | None:
        f, q = f_values.get(tensor), q_values.get(wanted.get(tensor, ""))
        if f is None or q is None or f.shape != q.shape or not np.issubdtype(f.dtype, np.floating):
            return None
        meter = _ErrorMeter(_channel_axis(f.shape, "NCHW"))
        meter.add(q, f)
        return meter.relative_error()

    layers = []
    if error(INPUT_NAME) is not None:
        meter = _ErrorMeter(_channel_axis(samples.shape, "NCHW"))
        meter.add(q_values[wanted[INPUT_NAME]], samples)
        layers.append(_input_layer(INPUT_NAME, meter))
    for node in reference.graph.node:
        for out in node.output:
            skip = node.op_type in _ONNX_SHAPE_OPS
            # Name the layer after the int8 graph's op that computes the tensor: quantize_static
            # folds a Relu/Clip into the Q of its Conv, and the Conv is what the error belongs to.
            source = producers.get(wanted.get(out, ""))
            if source is not None and source.op_type == "DequantizeLinear":
                source = producers.get(producers[source.input[0]].input[0]) if source.input[0] in producers else None
            op = node.op_type
            if source is not None and source.op_type != node.op_type:
                op = f"{source.op_type}+{node.op_type}"
            layers.append({
                "name": (source.name if source is not None else node.name) or out,
                "op": op,
                "tensor": out,
                "relative_error": None if skip else error(out),
                "inputs": list(node.input),
            })
    return layers


_ONNX_SHAPE_OPS = {"Shape", "Constant", "ConstantOfShape", "Gather", "Unsqueeze", "Range", "Cast"}


def _run_onnx_with_outputs(model, names: list[str], samples: np.ndarray, input_name: str) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    results = session.run(outputs, {input_name: samples})
    return dict(zip(outputs, results))
