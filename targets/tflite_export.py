"""PyTorch -> TFLite with litert-torch (no TensorFlow), loaded back with ai-edge-litert.

- fp32: ``litert_torch.convert``.
- fp16: the same conversion with litert-torch's fp16 recipe (ai-edge-quantizer float casting):
  float16 weights behind DEQUANTIZE ops, the form mobile GPU delegates run in half precision
  (the CPU dequantizes them once at load). Inputs and outputs stay float32.
- int8: full-integer, int8 input and int8 output tensors (tflite-runtime 2.14 and ai-edge-litert
  run it; the Raspberry Pi target needs it). litert-torch's PT2E quantizer (static int8
  activations, symmetric per-channel int8 weights), extended so that the ops of mobile
  architectures (ReLU6, hardswish, hardsigmoid and sigmoid gates of squeeze-excite, SiLU, channel
  shuffle, explicit padding, global pooling) are quantized too (``_full_integer_quantizer``), is
  calibrated by running the calibration samples through the prepared model; its lowering turns
  the QDQ graph into int8 kernels and drops the quantize/dequantize at the model boundary, so the file's I/O is int8 directly: no
  TensorFlow-converter ``inference_input_type`` step is needed. The quantizer here also
  quantizes the graph's inputs and outputs themselves, so the I/O stays int8 when the first or
  last op has no int8 pattern (that op then runs in float between DEQUANTIZE/QUANTIZE, listed
  in ``conversion["float_ops"]``).

Dropout is removed before conversion (modules and functional dropout: ``strip_dropout``,
``remove_dropout_nodes``): it is the identity at inference, and an eval-mode Dropout before a
Linear broke the int8 conversion.

Layout: litert-torch keeps the PyTorch signature, so image inputs are NCHW in the file (the
converter transposes to NHWC inside the graph; for one channel that is a free reshape).

litert-torch pulls in jax and transformers (seconds to import): it is imported on first export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Collection, Iterator, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from edgec.calibration.samples import calibration_digest
from edgec.errors import ExportError

from .exported import (
    ExportedModelInfo,
    calibration_inputs,
    dropout_ops,
    quiet_converter,
    remove_dropout_nodes,
    staged_file,
    strip_dropout,
    tensor_spec,
)

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
    per_channel: bool = True,
    activation_observer: Literal["histogram", "minmax"] = "histogram",
    qat: Mapping[str, Any] | None = None,
    float_ops: Collection[str] = (),
) -> ExportedModelInfo:
    """Write ``model`` to ``path`` as TFLite at ``precision``; nothing is left at ``path`` on failure.

    ``example`` is a batch-1 float32 input; ``calibration`` (N, ...) float32 inputs preprocessed
    like it, required for int8. Raises ExportError when conversion or the read-back fails, or
    when an int8 model does not come out with int8 inputs and outputs. ``model`` is not modified:
    a copy in eval mode, with dropout removed (:func:`strip_dropout`), is converted.

    Options (int8 only; fp32 and fp16 ignore them). Both are remedies the caller may retry with
    when int8 agreement is low; neither changes the file's int8 I/O:

    - ``per_channel`` (default True): one weight scale per output channel of each conv/linear
      (symmetric int8, what TFLite's int8 kernels and XNNPACK run natively). False gives one
      scale per weight tensor: coarser, for a delegate that wants per-tensor weights (some NPUs);
      it rarely helps accuracy. Activations are per-tensor either way.
    - ``activation_observer`` (default "histogram"): how activation ranges are chosen from the
      calibration samples. "histogram" is PyTorch's HistogramObserver (litert-torch's default):
      the range minimizing the L2 quantization error, which clips rare outliers; "minmax" keeps
      the full observed range (no clipping, coarser steps). The tensors feeding the model output
      always use min-max: clipping the logits' upper tail turns the top classes into ties.
      Measured on the edge fixtures: histogram was as good or better on most models, minmax
      better on ShuffleNetV2 (0.986 -> 0.997 top-1 agreement).

    edgec's ``export.calibration.method`` (minmax/percentile/entropy) is onnxruntime's and does not
    apply to TFLite; what else changes TFLite int8 ranges is the calibration samples themselves.

    ``qat`` (int8): the quantization state a qat stage trained (``edgec.targets.qat``). The int8
    model then takes its ranges and weight scales from it; no calibration runs and the options
    above do not apply.

    ``float_ops`` (int8): torch module paths whose ops stay float32 between DEQUANTIZE/QUANTIZE
    (selective mixed precision, ``float_ops_pt2e``); the file's I/O stays int8.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if activation_observer not in ("histogram", "minmax"):
        raise ValueError(f"activation_observer must be histogram or minmax, got {activation_observer!r}")
    path = Path(path)
    samples = calibration_inputs(calibration, example) if precision == "int8" and qat is None else None
    model = strip_dropout(model)
    with staged_file(path) as tmp, quiet_converter(), _litert_progress_off():
        try:
            if precision == "int8" and qat is not None:
                edge_model, conversion = _convert_int8_qat(model, example, qat)
            elif precision == "int8":
                edge_model, conversion = _convert_int8(model, example, samples, per_channel, activation_observer, float_ops)
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


def _convert_int8(
    model: torch.nn.Module,
    example: torch.Tensor,
    samples: np.ndarray,
    per_channel: bool = True,
    activation_observer: str = "histogram",
    float_ops: Collection[str] = (),
):
    litert_torch = _load_litert()
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph, capture, batch = _capture(model, example)
    quantizer = _full_integer_quantizer(per_channel, activation_observer)
    if float_ops:
        from .float_ops_pt2e import keep_ops_float

        quantizer = keep_ops_float(quantizer, float_ops)
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
        "tool": "litert-torch PT2EQuantizer (static int8, edgec annotations) + litert_torch.convert",
        **({"float_layers": quantizer.float_layers} if float_ops else {}),
        "per_channel": per_channel,
        "activation_observer": activation_observer,
        "capture": capture,
        "calibration_samples": len(samples),
        "calibration_digest": calibration_digest(samples),
    }


def _convert_int8_qat(model: torch.nn.Module, example: torch.Tensor, qat: Mapping[str, Any]):
    from litert_torch.quantize.quant_config import QuantConfig

    from .qat import convert_qat, restore_qat

    quantized = convert_qat(restore_qat(model, example, qat))
    quantizer = _full_integer_quantizer(qat["per_channel"], qat=True)
    edge_model = _load_litert().convert(quantized, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    return edge_model, {
        "precision": "int8",
        "tool": "litert-torch PT2EQuantizer QAT (edgec annotations, prepare_qat_pt2e) + litert_torch.convert",
        "per_channel": qat["per_channel"],
        "quantization_aware_training": True,
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
        remove_dropout_nodes(graph)
        if dropout_ops(graph):
            raise ExportError(f"dropout left in the captured graph: {', '.join(dropout_ops(graph))}")
        return graph, capture, batch
    raise ExportError("torch.export could not capture the model: " + "; ".join(errors))


def _full_integer_quantizer(per_channel: bool = True, activation_observer: str = "histogram", qat: bool = False):
    """litert-torch's PT2E quantizer (static int8 activations, int8 weights) with additions.

    The stock quantizer annotates known op patterns only (conv, linear, add, mul, pooling, concat,
    sigmoid/softmax), found by the source modules TorchDynamo records. Ops it leaves alone run in
    float inside an "int8" model, between DEQUANTIZE/QUANTIZE, or get requantized at scales the
    converter then rejects. On top of it (hardsigmoid and SiLU are first decomposed into ops that
    have int8 kernels, see ``_decompose_for_int8``):

    - a ReLU or ReLU6 (``hardtanh(0, 6)``) right after a conv, linear or add is fused: the producer
      gets no output observer and the activation's output is observed, the form TFLite's fused
      activations take (the stock quantizer fuses only ``nn.ReLU`` after a conv; a ReLU6 shared its
      producer's pre-activation range and wasted half the int8 range on negative values);
    - hardswish, and adds/muls/activations the stock patterns missed, get their own input and
      output observers (TFLite has int8 kernels for them); sigmoid and tanh get TFLite's fixed
      output parameters (1/256, -128) and (1/128, 0);
    - scale-preserving ops (reshape/view/flatten, permute/transpose, squeeze/unsqueeze, slicing,
      zero-valued pad, max and windowed average pooling) share their input's quantization, so a
      PAD before a strided convolution keeps the same scale (a pad requantized to another scale
      fails conversion: "'tfl.pad' op quantization parameters violate the same scale constraint");
    - a global mean (``adaptive_avg_pool2d`` to 1x1, ``mean`` over dims: TFLite MEAN, which
      requantizes) gets its own output scale instead of its input's: an average spans a fraction
      of its input's range (SqueezeNet's pooled logits: 7x finer steps, agreement 0.975 -> 1.0);
    - graph inputs, and tensors feeding the graph output, are quantized where no pattern did it,
      so the converted model has int8 I/O even when its first or last op runs in float; the
      tensors feeding the output are observed min-max (see ``activation_observer``);
    - a ReLU right after a scale-preserving op (max pooling) keeps that op's scale: the converter
      folds such a ReLU into its producer's output quantization, which breaks the producer's
      same-scale constraint and fails the conversion (conv-pool-relu, as in edgec's LeNet-5).

    ``qat``: the same annotations for ``prepare_qat_pt2e``, with fake-quantize modules instead of
    observers (``_qat_fake_quantizers``: moving-average min-max activations, so the tensors feeding
    the output already keep their full range; weights at their current range) and conv + BatchNorm
    annotated as one (``edgec.targets.qat``).
    """
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import (
        FixedQParamsQuantizationSpec,
        QuantizationAnnotation,
        SharedQuantizationSpec,
    )

    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat)
    if qat:
        config = _qat_fake_quantizers(config, per_channel)
    # QAT's activation fake-quantizers already track the full (moving-average) min-max range.
    minmax = config.input_activation if qat else dataclasses.replace(
        config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    if activation_observer not in ("histogram", "minmax"):
        raise ValueError(f"activation_observer must be histogram or minmax, got {activation_observer!r}")
    if activation_observer == "minmax" and not qat:
        config = dataclasses.replace(config, input_activation=minmax, output_activation=minmax)
    qspec = config.input_activation

    def annotated(node):
        return node.meta.get(_ANNOTATION) is not None and node.meta[_ANNOTATION]._annotated

    def edge_qspec(node: torch.fx.Node, producer):
        """The qspec of the edge producer -> node: the producer's own quantization where it has one."""
        if isinstance(producer, torch.fx.Node) and _output_qspec(producer) is not None:
            return SharedQuantizationSpec(producer)
        return qspec

    def annotate_own(node, inputs, output_qspec):
        inputs = [a for a in inputs if isinstance(a, torch.fx.Node)]
        node.meta[_ANNOTATION] = QuantizationAnnotation(
            input_qspec_map={a: edge_qspec(node, a) for a in inputs}, output_qspec=output_qspec, _annotated=True
        )

    def annotate_shared(node, producer):
        node.meta[_ANNOTATION] = QuantizationAnnotation(
            input_qspec_map={producer: edge_qspec(node, producer)},
            output_qspec=SharedQuantizationSpec((producer, node)),
            _annotated=True,
        )

    def fuse_activation(node) -> bool:
        producer = node.args[0]
        if not (
            isinstance(producer, torch.fx.Node)
            and producer.target in _FUSES_ACTIVATION
            and len(producer.users) == 1
            and annotated(producer)
            and _is_plain_qspec(_output_qspec(producer))
        ):
            return False
        inputs = producer.meta[_ANNOTATION].input_qspec_map
        producer.meta[_ANNOTATION] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=None, _annotated=True)
        node.meta[_ANNOTATION] = QuantizationAnnotation(output_qspec=qspec, _annotated=True)
        return True

    class FullIntegerQuantizer(PT2EQuantizer):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return super().transform_for_annotation(_decompose_for_int8(model))

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            with _conv_bn_patterns_as_modules():
                model = super().annotate(model)
            for node in model.graph.nodes:
                if node.op == "placeholder" and not all(node in _input_qspecs(user) for user in node.users):
                    node.meta[_ANNOTATION] = QuantizationAnnotation(output_qspec=qspec, _annotated=True)
                elif node.op == "output":
                    unquantized = [n for n in node.all_input_nodes if _output_qspec(n) is None]
                    if unquantized:
                        node.meta[_ANNOTATION] = QuantizationAnnotation(
                            input_qspec_map=dict.fromkeys(unquantized, minmax), _annotated=True
                        )
                    for n in node.all_input_nodes:
                        _observe_full_range(n, minmax)
                elif node.op == "call_function":
                    self._annotate_leftover(node)
            return model

        def _annotate_leftover(self, node: torch.fx.Node) -> None:
            target, producer = node.target, (node.args[0] if node.args else None)
            if not _is_float(node):  # e.g. BatchNorm's num_batches_tracked += 1 in a graph captured for training
                return
            if _is_relu(node):
                if isinstance(_output_qspec(producer), SharedQuantizationSpec) and not annotated(node):
                    node.meta[_ANNOTATION] = QuantizationAnnotation(
                        input_qspec_map={producer: qspec},
                        output_qspec=SharedQuantizationSpec((producer, node)),
                        _annotated=True,
                    )
                elif not fuse_activation(node) and not annotated(node):
                    annotate_own(node, [producer], qspec)
            elif target in _MEAN_OPS and _is_global_mean(node) and isinstance(producer, torch.fx.Node):
                # TFLite's int8 MEAN requantizes: an average spans a fraction of its input's range,
                # and sharing the input's scale (the stock annotation) wasted bits on the logits of
                # an all-convolutional head (SqueezeNet: 7x coarser than needed).
                if annotated(node):
                    node.meta[_ANNOTATION].output_qspec = qspec
                else:
                    annotate_own(node, [producer], qspec)
            elif annotated(node) or not isinstance(producer, torch.fx.Node):
                return
            elif target in _OWN_SCALE_OPS:
                annotate_own(node, list(node.args), qspec)
            elif target in _FIXED_SCALE_OPS:
                scale, zero_point = _FIXED_SCALE_OPS[target]
                fixed = FixedQParamsQuantizationSpec(
                    dtype=torch.int8, scale=scale, zero_point=zero_point, quant_min=-128, quant_max=127,
                    qscheme=torch.per_tensor_affine,
                )
                annotate_own(node, [producer], fixed)
            elif target in _SAME_SCALE_OPS or (target in _PAD_OPS and _pads_with_zero(node)):
                annotate_shared(node, producer)

    return FullIntegerQuantizer().set_global(config)


def _qat_fake_quantizers(config, per_channel: bool):
    """litert-torch's QAT config with fake-quantizers whose parameters are the ones convert_pt2e uses.

    Its ``FusedMovingAvgObsFakeQuantize`` computes a symmetric weight scale inside the fused kernel as
    max|w| / 127.5 (the full -128..127 range), while ``convert_pt2e`` computes max|w| / 127 for the
    -127..127 range the spec asks for: the int8 model then rounded weights differently from the model
    that was trained (a tiny MobileNetV3 agreed with its own fake-quantized model on 94%). The plain
    ``FakeQuantize`` takes its parameters from the observer's ``calculate_qparams``, as convert does.
    Weights are observed at their current range (averaging constant 1, as TensorFlow's QAT does): a
    moving average lagged behind weights still moving in fine-tuning and clipped up to 1.8x of them.
    """
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import (
        MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
    )

    activation = dataclasses.replace(
        config.input_activation,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=2**-12),
    )
    weight_observer = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
    weight = dataclasses.replace(
        config.weight,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=weight_observer, averaging_constant=1.0, eps=2**-12),
    )
    return dataclasses.replace(config, input_activation=activation, output_activation=activation, weight=weight)


@contextlib.contextmanager
def _conv_bn_patterns_as_modules() -> Iterator[None]:
    """Work around litert-torch 0.10's QAT conv-bn annotator, which hands ``torch.export`` a plain
    function as its pattern (torch 2.13 refuses: "Expected `mod` to be an instance of
    torch.nn.Module"); torchao's own patterns wrap theirs in ``WrapperModule``, done here too.
    Only QAT configurations reach that annotator."""
    from litert_torch.quantize import pt2e_quantizer_utils as utils
    from torchao.quantization.pt2e.export_utils import WrapperModule

    original = utils._get_aten_graph_module_for_pattern

    def wrapped(pattern, *args, **kwargs):
        return original(pattern if isinstance(pattern, torch.nn.Module) else WrapperModule(pattern), *args, **kwargs)

    utils._get_aten_graph_module_for_pattern = wrapped
    try:
        yield
    finally:
        utils._get_aten_graph_module_for_pattern = original


_ANNOTATION = "quantization_annotation"  # the node.meta key PT2E quantizers write
_aten = torch.ops.aten
_RELU = (_aten.relu.default, _aten.relu_.default)
_HARDTANH = (_aten.hardtanh.default, _aten.hardtanh_.default)
_FUSES_ACTIVATION = {  # ops whose TFLite kernel takes a fused RELU / RELU6
    _aten.conv1d.default, _aten.conv2d.default, _aten.convolution.default, _aten.linear.default,
    _aten.add.Tensor, _aten.add_.Tensor,
}
_OWN_SCALE_OPS = {  # int8 TFLite kernels with their own output scale
    _aten.hardswish.default, _aten.hardswish_.default,
    _aten.add.Tensor, _aten.add_.Tensor, _aten.sub.Tensor, _aten.mul.Tensor, _aten.mul_.Tensor,
    _aten.leaky_relu.default, _aten.elu.default,
}
_FIXED_SCALE_OPS = {  # TFLite's int8 LOGISTIC and TANH require these output parameters
    _aten.sigmoid.default: (1.0 / 256.0, -128),
    _aten.sigmoid_.default: (1.0 / 256.0, -128),
    _aten.tanh.default: (1.0 / 128.0, 0),
    _aten.tanh_.default: (1.0 / 128.0, 0),
}
_SAME_SCALE_OPS = {  # ops that move values without computing new ones, and poolings TFLite keeps at one scale
    _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.flatten.using_ints,
    _aten.permute.default, _aten.transpose.int, _aten.t.default, _aten.contiguous.default, _aten.clone.default,
    _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default, _aten.unsqueeze.default,
    _aten.expand.default, _aten.slice.Tensor, _aten.select.int, _aten.channel_shuffle.default,
    _aten.pixel_shuffle.default, _aten.max_pool2d.default, _aten.avg_pool2d.default,
    _aten.adaptive_avg_pool2d.default, _aten.mean.dim, _aten.upsample_nearest2d.vec,
}
_MEAN_OPS = {_aten.adaptive_avg_pool2d.default, _aten.mean.dim}
_PAD_OPS = {_aten.pad.default, _aten.constant_pad_nd.default}


def _decompose_for_int8(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite ops that TFLite has no int8 kernel for into ops that it has, before annotation.

    - ``hardsigmoid(x)`` -> ``hardtanh(x + 3, 0, 6) * (1/6)``: ADD with a fused RELU6 and a MUL.
      Left whole, the converter decomposes it after quantization and runs the pieces in float
      (the float ADD/MUL islands a MobileNetV3 squeeze-excite gate left in "full-integer" models).
    - ``silu(x)`` -> ``x * sigmoid(x)``: LOGISTIC (fixed int8 output parameters) and MUL.
    Each new node gets an observer when annotated, so each intermediate tensor has its own range.
    """
    graph = model.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _DECOMPOSED:
            continue
        x = node.args[0]
        with graph.inserting_before(node):
            if node.target in (_aten.hardsigmoid.default, _aten.hardsigmoid_.default):
                shifted = _like(graph.call_function(_aten.add.Tensor, (x, 3.0)), node)
                clamped = _like(graph.call_function(_aten.hardtanh.default, (shifted, 0.0, 6.0)), node)
                result = _like(graph.call_function(_aten.mul.Tensor, (clamped, 1.0 / 6.0)), node)
            else:
                gate = _like(graph.call_function(_aten.sigmoid.default, (x,)), node)
                result = _like(graph.call_function(_aten.mul.Tensor, (x, gate)), node)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
    graph.lint()
    model.recompile()
    return model


_DECOMPOSED = {
    _aten.hardsigmoid.default, _aten.hardsigmoid_.default, _aten.silu.default, _aten.silu_.default,
}


def _like(new: torch.fx.Node, old: torch.fx.Node) -> torch.fx.Node:
    """Give a node created to replace ``old`` (same shape and dtype) its metadata."""
    for key in ("val", "tensor_meta", "nn_module_stack", "stack_trace"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    return new


def _is_relu(node: torch.fx.Node) -> bool:
    if node.target in _RELU:
        return True
    if node.target in _HARDTANH:
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return low == 0 and high == 6
    return False


def _is_float(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return not isinstance(value, torch.Tensor) or value.is_floating_point()


def _is_global_mean(node: torch.fx.Node) -> bool:
    """A mean over whole feature maps (lowered to TFLite MEAN), not a windowed average pooling."""
    if node.target == _aten.mean.dim:
        return True
    size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    return list(size) in ([1], [1, 1]) if isinstance(size, (list, tuple)) else size == 1


def _pads_with_zero(node: torch.fx.Node) -> bool:
    if node.target == _aten.constant_pad_nd.default:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        return not value
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    return mode == "constant" and not value


def _observe_full_range(node: torch.fx.Node, minmax) -> None:
    """Give the quantization that ``node``'s output uses (following shared specs to the tensor that
    owns it) a min-max observer."""
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    owner, key = node, None  # key None: the owner's output; else the input edge (key -> owner)
    for _ in range(100):
        annotation = owner.meta.get(_ANNOTATION)
        if annotation is None:
            return
        spec = annotation.output_qspec if key is None else annotation.input_qspec_map.get(key)
        if not isinstance(spec, SharedQuantizationSpec):
            break
        target = spec.edge_or_node
        owner, key = (target[1], target[0]) if isinstance(target, tuple) else (target, None)
    if not _is_plain_qspec(spec):
        return
    if key is None:
        annotation.output_qspec = minmax
    else:
        annotation.input_qspec_map[key] = minmax


def _is_plain_qspec(spec) -> bool:
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    return isinstance(spec, QuantizationSpec)


def _output_qspec(node):
    annotation = node.meta.get(_ANNOTATION) if isinstance(node, torch.fx.Node) else None
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
