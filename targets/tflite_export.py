"""PyTorch -> TFLite with litert-torch (no TensorFlow), loaded back with ai-edge-litert.

- fp32: ``litert_torch.convert``.
- fp16: the same conversion with litert-torch's fp16 recipe (ai-edge-quantizer float casting):
  float16 weights behind DEQUANTIZE ops, the form mobile GPU delegates run in half precision
  (the CPU dequantizes them once at load). Inputs and outputs stay float32.
- int8: full-integer, int8 input and int8 output tensors (tflite-runtime 2.14 and ai-edge-litert
  run it; the Raspberry Pi target needs it). litert-torch's PT2E quantizer (static int8
  activations, symmetric per-channel int8 weights) is calibrated by running the calibration
  samples through the prepared model; its lowering turns the QDQ graph into int8 kernels and
  drops the quantize/dequantize at the model boundary, so the file's I/O is int8 directly: no
  TensorFlow-converter ``inference_input_type`` step is needed. The quantizer here also
  quantizes the graph's inputs and outputs themselves, so the I/O stays int8 when the first or
  last op has no int8 pattern (that op then runs in float between DEQUANTIZE/QUANTIZE, listed
  in ``conversion["float_ops"]``).

Layout: litert-torch keeps the PyTorch signature, so image inputs are NCHW in the file (the
converter transposes to NHWC inside the graph; for one channel that is a free reshape).

litert-torch pulls in jax and transformers (seconds to import): it is imported on first export.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from edgec.calibration.samples import calibration_digest
from edgec.errors import ExportError

from .exported import ExportedModelInfo, calibration_inputs, quiet_converter, staged_file, tensor_spec

# The converter's C++ logs INFO lines (op counts) on every conversion; keep warnings and errors.
# Read when the native library loads, so this must precede the first litert import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 64
_NUMPY_DTYPES = {np.float32: "float32", np.float16: "float16", np.int8: "int8"}


def export_tflite(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    precision: Literal["fp32", "fp16", "int8"],
    calibration: np.ndarray | None = None,
) -> ExportedModelInfo:
    """Write ``model`` to ``path`` as TFLite at ``precision``; nothing is left at ``path`` on failure.

    ``example`` is a batch-1 float32 input; ``calibration`` (N, ...) float32 inputs preprocessed
    like it, required for int8. Raises ExportError when conversion or the read-back fails, or
    when an int8 model does not come out with int8 inputs and outputs.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    path = Path(path)
    samples = calibration_inputs(calibration, example) if precision == "int8" else None
    model = copy.deepcopy(model).eval()
    with staged_file(path) as tmp, quiet_converter(), _litert_progress_off():
        try:
            if precision == "int8":
                edge_model, conversion = _convert_int8(model, example, samples)
            else:
                edge_model, conversion = _convert_float(model, example, precision)
            edge_model.export(str(tmp))
            inputs, outputs = _read_back(tmp, example)
            if precision == "int8":
                conversion["float_ops"] = _float_ops(tmp)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"TFLite {precision} export failed: {type(e).__name__}: {e}") from e
        if precision == "int8" and any(t["dtype"] != "int8" for t in inputs + outputs):
            raise ExportError(
                "the int8 TFLite model did not come out full-integer (int8 inputs and outputs): "
                f"inputs {[t['dtype'] for t in inputs]}, outputs {[t['dtype'] for t in outputs]}"
            )
    if conversion.get("float_ops"):
        log.warning("int8 TFLite model %s runs these ops in float: %s", path.name, ", ".join(conversion["float_ops"]))
    versions = {name: version(name) for name in ("torch", "litert-torch", "ai-edge-litert")}
    return ExportedModelInfo(path, inputs, outputs, versions, conversion)


def _convert_float(model: torch.nn.Module, example: torch.Tensor, precision: str):
    litert_torch = _load_litert()
    from litert_torch.generative.quantize import quant_recipes

    if precision == "fp16":
        # Despite the module name, the fp16 recipe is a whole-model ('.*') float-casting recipe.
        edge_model = litert_torch.convert(model, (example,), quant_config=quant_recipes.full_fp16_recipe())
        return edge_model, {"precision": "fp16", "tool": "litert_torch.convert + full_fp16_recipe (fp16 weights)"}
    return litert_torch.convert(model, (example,)), {"precision": "fp32", "tool": "litert_torch.convert"}


def _convert_int8(model: torch.nn.Module, example: torch.Tensor, samples: np.ndarray):
    litert_torch = _load_litert()
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph, capture, batch = _capture(model, example)
    quantizer = _full_integer_quantizer()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for start in range(0, len(samples), batch):
            prepared(torch.from_numpy(samples[start : start + batch]))
    quantized = convert_pt2e(prepared, fold_quantize=False)
    move_exported_model_to_eval(quantized)
    # An exported GraphModule refuses .eval(); the graph was captured in eval mode, so only the
    # flag litert-torch checks (and warns about) is stale.
    torch.nn.Module.train(quantized, False)
    edge_model = litert_torch.convert(quantized, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    return edge_model, {
        "precision": "int8",
        "tool": "litert-torch PT2EQuantizer (static, per-channel weights) + litert_torch.convert",
        "capture": capture,
        "calibration_samples": len(samples),
        "calibration_digest": calibration_digest(samples),
    }


def _capture(model: torch.nn.Module, example: torch.Tensor):
    """``torch.export`` the model for PT2E; returns (graph module, capture mode, calibration batch).

    Strict (TorchDynamo) capture records the ``source_fn_stack`` that the quantizer's add,
    pooling and concat annotators match on; non-strict capture drops it and those ops stay
    float. A dynamic batch dimension lets calibration run in batches: the histogram observers
    cost tens of milliseconds per call, whatever the batch size. Each later attempt gives up
    one of the two, for models that do not trace that way.
    """
    pair = torch.cat([example, example])  # a batch-1 example would specialize the batch to 1
    attempts = [
        ("strict, dynamic batch", lambda: torch.export.export(
            model, (pair,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=True), CALIBRATION_BATCH),
        ("strict", lambda: torch.export.export(model, (example,), strict=True), 1),
        ("non-strict", lambda: torch.export.export(model, (example,), strict=False), 1),
    ]
    errors = []
    for capture, export, batch in attempts:
        try:
            graph = export().module()
        except Exception as e:
            errors.append(f"{capture}: {type(e).__name__}: {e}")
            continue
        if errors:
            log.warning("torch.export fell back to %s capture (%s)", capture, "; ".join(errors))
        return graph, capture, batch
    raise ExportError("torch.export could not capture the model: " + "; ".join(errors))


def _full_integer_quantizer():
    """litert-torch's PT2E quantizer (static int8, per-channel weights) with two additions.

    The stock quantizer annotates known op patterns only. On top of it:
    - graph inputs, and tensors feeding the graph output, are quantized where no pattern did it,
      so the converted model has int8 I/O even when its first or last op runs in float;
    - a ReLU right after a scale-preserving op (max pooling) keeps that op's scale: the converter
      folds such a ReLU into its producer's output quantization, which breaks the producer's
      same-scale constraint and fails the conversion (conv-pool-relu, as in edgec's LeNet-5).
    """
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    class FullIntegerQuantizer(PT2EQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            qspec = self.global_config.input_activation
            for node in model.graph.nodes:
                if node.op == "placeholder" and not all(node in _input_qspecs(user) for user in node.users):
                    node.meta[_ANNOTATION] = QuantizationAnnotation(output_qspec=qspec, _annotated=True)
                elif node.op == "output":
                    unquantized = [n for n in node.all_input_nodes if _output_qspec(n) is None]
                    if unquantized:
                        node.meta[_ANNOTATION] = QuantizationAnnotation(
                            input_qspec_map=dict.fromkeys(unquantized, qspec), _annotated=True
                        )
                elif (
                    node.target in _RELU
                    and _ANNOTATION not in node.meta
                    and isinstance(_output_qspec(node.args[0]), SharedQuantizationSpec)
                ):
                    node.meta[_ANNOTATION] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: qspec},
                        output_qspec=SharedQuantizationSpec((node.args[0], node)),
                        _annotated=True,
                    )
            return model

    return FullIntegerQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))


_ANNOTATION = "quantization_annotation"  # the node.meta key PT2E quantizers write
_RELU = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)


def _output_qspec(node: torch.fx.Node):
    annotation = node.meta.get(_ANNOTATION)
    return annotation.output_qspec if annotation is not None else None


def _input_qspecs(node: torch.fx.Node) -> dict:
    annotation = node.meta.get(_ANNOTATION)
    return annotation.input_qspec_map if annotation is not None else {}


def _read_back(path: Path, example: torch.Tensor) -> tuple[list[dict], list[dict]]:
    """I/O tensors as ai-edge-litert sees them, after one run on ``example`` proves the file runs."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    interpreter.allocate_tensors()
    first = interpreter.get_input_details()[0]
    interpreter.set_tensor(first["index"], _to_input_dtype(example.numpy(), first))
    interpreter.invoke()

    def spec(detail: dict) -> dict:
        scale, zero_point = detail["quantization"]
        quantization = {"scale": float(scale), "zero_point": int(zero_point)} if scale else None
        shape = detail["shape_signature"].tolist()
        return tensor_spec(detail["name"], shape, _NUMPY_DTYPES[detail["dtype"]], quantization)

    return [spec(d) for d in interpreter.get_input_details()], [spec(d) for d in interpreter.get_output_details()]


def _to_input_dtype(x: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] != np.int8:
        return x.astype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    return np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)


def _float_ops(path: Path) -> list[str]:
    """Names of the ops in an int8 model that compute in float32 (not counting (de)quantize)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = flatbuffer_utils.read_model(str(path))
    found = []
    for graph in model.subgraphs:
        for op in graph.operators:
            name = names[model.operatorCodes[op.opcodeIndex].builtinCode]
            outputs_float = any(graph.tensors[i].type == schema.TensorType.FLOAT32 for i in op.outputs)
            if outputs_float and name not in ("QUANTIZE", "DEQUANTIZE"):
                found.append(name)
    return found


def _load_litert():
    """Import litert-torch with its dependencies' import-time warnings muted: torchao reports its
    CUDA kernels missing on a CPU machine, and torch deprecates a pytree call torchao makes."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import litert_torch
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return litert_torch


@contextlib.contextmanager
def _litert_progress_off() -> Iterator[None]:
    """Hide litert-torch's per-conversion progress tree, unless the user asked for it."""
    variable = "LITERT_TORCH_SHOW_PROGRESS"
    if variable in os.environ:
        yield
        return
    os.environ[variable] = "n"
    try:
        yield
    finally:
        os.environ.pop(variable, None)
