"""PyTorch -> ONNX in fp32, fp16 or int8, checked with onnx and loaded back with onnxruntime.

- fp32: ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``: it needs no
  onnxscript and gave the same numbers here), opset 17, dynamic batch dimension.
- fp16: ``onnxruntime.transformers.float16.convert_float_to_float16`` with ``keep_io_types``
  (onnxconverter-common is not a dependency): float16 weights and activations, float32 inputs
  and outputs.
- int8: ``onnxruntime.quantization.quant_pre_process`` (shape inference, BatchNorm folding), then
  ``quantize_static`` in QDQ format with int8 activations and weights (s8s8), per-channel weights
  by default, calibrated by feeding the calibration samples one at a time. Inputs and outputs stay
  float32 (QDQ keeps the float interface); the graph quantizes at its edges. Weights use 7 bits
  (``reduce_range``): on x86 CPUs without VNNI (AVX2 only: AMD Zen 2 and 3, Intel before Ice Lake)
  onnxruntime multiplies with ``VPMADDUBSW``, whose 16-bit pair sums saturate for 8-bit weights
  (onnxruntime's quantization docs). Measured on an AVX2-only AMD EPYC: an int8 LeNet-5 off by
  14% of its output range with 8-bit weights, 0.9% with 7; the result is then the same integer
  arithmetic on every x86 CPU, so the test vectors built on one reproduce on the others.

Calibration methods are onnxruntime's. ``quantize_static`` runs its entropy calibrator with 128
histogram bins and 128 quantized bins, which leaves the KL search one candidate, the full range:
"entropy" then gives the same ranges as "minmax" (onnxruntime 1.31). A real 2048-bin KL search
clipped harder and lost agreement on the test models here, so the option is passed on as is.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from edgec.calibration.readers import OnnxCalibrationReader
from edgec.calibration.samples import calibration_digest
from edgec.base.errors import ExportError

from .float_ops_onnx import nodes_to_exclude
from .exported import ExportedModelInfo, calibration_inputs, quiet_converter, staged_file, strip_dropout, tensor_spec

OPSET = 17  # >= 13 for per-channel QuantizeLinear; every onnxruntime >= 1.20 runs it
INPUT_NAME = "input"

_CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8"}


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    precision: Literal["fp32", "fp16", "int8"],
    calibration: np.ndarray | None = None,
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax",
    per_channel: bool = True,
    qat: Mapping[str, Any] | None = None,
    float_ops: Collection[str] = (),
) -> ExportedModelInfo:
    """Write ``model`` to ``path`` as ONNX at ``precision``; nothing is left at ``path`` on failure.

    ``example`` is a batch-1 float32 input; ``calibration`` (N, ...) float32 inputs preprocessed
    like it, required for int8. Raises ExportError when conversion or the read-back fails.
    ``model`` is not modified: a copy in eval mode, with dropout modules replaced by identities
    (:func:`strip_dropout`), is exported.

    Options (int8 only; fp32 and fp16 ignore them), remedies a caller may retry with when int8
    agreement is low. They act on onnxruntime's quantizer and so on every ONNX runtime the file
    goes to (CPU, CUDA, TensorRT read the same QDQ ranges); TFLite has its own (see
    ``export_tflite``: ``per_channel``, ``activation_observer``):

    - ``calibration_method`` (edgec's ``export.calibration.method``, ONNX only): how activation
      ranges come from the calibration samples. "minmax": the full observed range (no clipping);
      "percentile": onnxruntime's 99.999th percentile of |x|, symmetric (clips rare outliers,
      finer steps for the rest); "entropy": KL-divergence calibration, which onnxruntime 1.31 runs
      with 128 bins, leaving one candidate: the same ranges as minmax (see the module docstring).
    - ``per_channel`` (default True): one weight scale per output channel of each Conv/Gemm
      (onnxruntime's ``per_channel``; QDQ with an axis). False: one scale per weight tensor, for
      an execution provider that wants per-tensor weights; coarser. Activations are per-tensor.

    ``qat`` (int8): the quantization state a qat stage trained (``edgec.targets.qat``). The QDQ
    graph is then the quantization-aware-trained one, exported by ``torch.onnx``'s dynamo
    exporter (which writes PT2E's quantize/dequantize ops as QuantizeLinear/DequantizeLinear);
    no calibration runs and the options above do not apply.

    ``float_ops`` (int8): names of nodes (as ``quant_pre_process`` leaves them, the names the int8
    diagnosis gives ONNX layers) that ``quantize_static`` leaves in float (``nodes_to_exclude``):
    selective mixed precision.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if calibration_method not in _CALIBRATION_METHODS:
        raise ValueError(f"calibration_method must be minmax, percentile or entropy, got {calibration_method!r}")
    path = Path(path)
    samples = calibration_inputs(calibration, example) if precision == "int8" and qat is None else None
    conversion: dict = {"precision": precision, "opset": OPSET}
    with staged_file(path) as tmp, tempfile.TemporaryDirectory() as work, quiet_converter():
        fp32_path = tmp if precision == "fp32" else Path(work) / "fp32.onnx"
        try:
            if precision == "int8" and qat is not None:
                conversion |= _export_qat_qdq(model, example, qat, tmp)
            else:
                _export_fp32(model, example, fp32_path)
            if precision == "fp16":
                _save_fp16(fp32_path, tmp)
                conversion["tool"] = "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)"
            elif precision == "int8" and qat is None:
                prepared = Path(work) / "prepared.onnx"
                quant_pre_process(fp32_path, prepared)
                excluded = nodes_to_exclude(onnx.load(str(prepared)), float_ops) if float_ops else []
                quantize_static(
                    prepared,
                    tmp,
                    OnnxCalibrationReader(samples, INPUT_NAME),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    reduce_range=True,
                    calibrate_method=_CALIBRATION_METHODS[calibration_method],
                    nodes_to_exclude=excluded,
                )
                conversion |= {
                    "tool": "onnxruntime.quantization.quantize_static(QDQ, s8s8, 7-bit weights)",
                    "per_channel": per_channel,
                    "weight_bits": 7,
                    "calibration_method": calibration_method,
                    "calibration_samples": len(samples),
                    "calibration_digest": calibration_digest(samples),
                    **({"float_layers": excluded} if float_ops else {}),
                }
            elif precision == "fp32":
                conversion["tool"] = "torch.onnx.export(dynamo=False)"
            onnx.checker.check_model(str(tmp), full_check=True)
            inputs, outputs = _read_back(tmp, example)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"ONNX {precision} export failed: {type(e).__name__}: {e}") from e
    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}
    return ExportedModelInfo(path, inputs, outputs, versions, conversion)


def _export_fp32(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    model = strip_dropout(model)
    with torch.no_grad():
        out = model(example)
    output_names = ["output"] if isinstance(out, torch.Tensor) else [f"output_{i}" for i in range(len(out))]
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=output_names,
        dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *output_names]},
    )


def _export_qat_qdq(model: torch.nn.Module, example: torch.Tensor, qat: Mapping[str, Any], path: Path) -> dict:
    """The quantization-aware-trained graph as QDQ ONNX. The TorchScript exporter has no
    translation for PT2E's quantize/dequantize ops; the dynamo exporter (onnxscript) does, at its
    own opset (18), which every onnxruntime edgec supports runs."""
    from .qat import WEIGHT_BITS, convert_qat, record_weight_bits, restore_qat

    if record_weight_bits(qat) != WEIGHT_BITS["onnx"]:
        raise ExportError(f"this model was quantization-aware trained with {record_weight_bits(qat)}-bit weights; the ONNX "
                          f"int8 route needs {WEIGHT_BITS['onnx']} (onnxruntime saturates 8-bit weights on x86 without "
                          f"VNNI): rerun the qat stage for this target")
    quantized = convert_qat(restore_qat(model, example, qat))
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        quantized, (torch.cat([example, example]),), dynamo=True, input_names=[INPUT_NAME], output_names=["output"],
        dynamic_shapes=({0: batch},), verbose=False,
    )
    program.save(str(path))
    return {
        "tool": "PT2E prepare_qat_pt2e (edgec annotations) + torch.onnx.export(dynamo=True), QDQ",
        "opset": program.model.opset_imports[""],
        "per_channel": qat["per_channel"],
        "weight_bits": WEIGHT_BITS["onnx"],
        "quantization_aware_training": True,
    }


def _save_fp16(fp32_path: Path, path: Path) -> None:
    fp16 = OnnxModel(convert_float_to_float16(onnx.load(fp32_path), keep_io_types=True))
    # The converter appends the float32<->float16 Casts for kept I/O types at the end of the node
    # list; onnxruntime accepts that, the ONNX checker (and other runtimes) need topological order.
    fp16.topological_sort(is_deterministic=True)
    onnx.save(fp16.model, path)


def _read_back(path: Path, example: torch.Tensor) -> tuple[list[dict], list[dict]]:
    """I/O tensors as onnxruntime sees them, after one run on ``example`` proves the file runs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the CPU provider warns about fp16 node placement
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: example.numpy()})

    def spec(arg) -> dict:
        shape = [d if isinstance(d, int) else -1 for d in arg.shape]
        return tensor_spec(arg.name, shape, _ORT_DTYPES[arg.type])

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]
