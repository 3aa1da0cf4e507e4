"""edgec's int8 quantizer: litert-torch's PT2E quantizer with annotations for the ops of edge models.

One quantizer for both int8 routes: post-training quantization (``tflite_export``: observers,
calibrated on samples) and quantization-aware training (``qat``: the same annotations with
fake-quantize modules, whose trained state both the TFLite and the ONNX exporter convert). It is
litert-torch's quantizer because TFLite's int8 kernels set the constraints it encodes (fused
activations, fixed output parameters, same-scale ops); ONNX Runtime runs a QDQ graph of it too.

- :func:`capture_graph`: ``torch.export`` the model the way PT2E needs (strict, dynamic batch when it can);
- :func:`full_integer_quantizer`: the quantizer (``qat=True``: its fake-quantize form);
- :func:`decompose_for_int8`: rewrites ops with no int8 kernel before annotation;
- :func:`load_litert`: imports litert-torch (seconds: jax, transformers) with its import noise muted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator

import torch

from edgec.base.errors import ExportError

from .exported import dropout_ops, remove_dropout_nodes

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 64


def capture_graph(model: torch.nn.Module, example: torch.Tensor):
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


def full_integer_quantizer(per_channel: bool = True, activation_observer: str = "histogram", qat: bool = False,
                           weight_bits: int = 8):
    """litert-torch's PT2E quantizer (static int8 activations, int8 weights) with additions.

    The stock quantizer annotates known op patterns only (conv, linear, add, mul, pooling, concat,
    sigmoid/softmax), found by the source modules TorchDynamo records. Ops it leaves alone run in
    float inside an "int8" model, between DEQUANTIZE/QUANTIZE, or get requantized at scales the
    converter then rejects. On top of it (hardsigmoid and SiLU are first decomposed into ops that
    have int8 kernels, see ``decompose_for_int8``):

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
    observers (``qat_fake_quantizers``: moving-average min-max activations, so the tensors feeding
    the output already keep their full range; weights at their current range) and conv + BatchNorm
    annotated as one (``edgec.targets.qat``).

    ``weight_bits``: 8 (-127..127) or 7 (-63..63, what the ONNX int8 route needs: ``onnx_export``).
    """
    if activation_observer not in ("histogram", "minmax"):
        raise ValueError(f"activation_observer must be histogram or minmax, got {activation_observer!r}")
    config, minmax = _quantization_config(per_channel, activation_observer, qat, weight_bits)
    quantizer = _quantizer_class()()
    quantizer.annotations = _Annotations(config.input_activation, minmax)
    return quantizer.set_global(config)


def _quantization_config(per_channel: bool, activation_observer: str, qat: bool, weight_bits: int):
    """litert-torch's symmetric config with edgec's observers, and the min-max activation spec that
    the tensors feeding the graph output get."""
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.observer import MinMaxObserver

    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat)
    if weight_bits != 8:
        largest = 2 ** (weight_bits - 1) - 1
        config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, quant_min=-largest, quant_max=largest))
    if qat:
        config = qat_fake_quantizers(config, per_channel)
    # QAT's activation fake-quantizers already track the full (moving-average) min-max range.
    minmax = config.input_activation if qat else dataclasses.replace(
        config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    if activation_observer == "minmax" and not qat:
        config = dataclasses.replace(config, input_activation=minmax, output_activation=minmax)
    return config, minmax


@functools.cache
def _quantizer_class():
    """The PT2EQuantizer subclass (defined on first use: litert-torch takes seconds to import)."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer

    class FullIntegerQuantizer(PT2EQuantizer):
        annotations: _Annotations

        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return super().transform_for_annotation(decompose_for_int8(model))

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            with conv_bn_patterns_as_modules():
                model = super().annotate(model)
            self.annotations.annotate_rest(model)
            return model

    return FullIntegerQuantizer


class _Annotations:
    """edgec's annotations, applied after the stock patterns (see :func:`full_integer_quantizer`).

    ``qspec``: the activation quantization a tensor gets where it needs its own; ``minmax``: the
    one for the tensors feeding the graph output."""

    def __init__(self, qspec, minmax):
        self.qspec, self.minmax = qspec, minmax

    def annotate_rest(self, model: torch.fx.GraphModule) -> None:
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

        for node in model.graph.nodes:
            if node.op == "placeholder" and not all(node in _input_qspecs(user) for user in node.users):
                node.meta[_ANNOTATION] = QuantizationAnnotation(output_qspec=self.qspec, _annotated=True)
            elif node.op == "output":
                unquantized = [n for n in node.all_input_nodes if _output_qspec(n) is None]
                if unquantized:
                    node.meta[_ANNOTATION] = QuantizationAnnotation(
                        input_qspec_map=dict.fromkeys(unquantized, self.minmax), _annotated=True
                    )
                for n in node.all_input_nodes:
                    _observe_full_range(n, self.minmax)
            elif node.op == "call_function":
                self.annotate_leftover(node)

    def annotate_leftover(self, node: torch.fx.Node) -> None:
        """An op the stock patterns left alone (or a ReLU / global mean they annotated differently)."""
        from torchao.quantization.pt2e.quantizer import FixedQParamsQuantizationSpec

        target, producer = node.target, (node.args[0] if node.args else None)
        if not _is_float(node):  # e.g. BatchNorm's num_batches_tracked += 1 in a graph captured for training
            return
        if is_relu(node):
            self.annotate_relu(node, producer)
        elif target in _MEAN_OPS and _is_global_mean(node) and isinstance(producer, torch.fx.Node):
            # TFLite's int8 MEAN requantizes: an average spans a fraction of its input's range,
            # and sharing the input's scale (the stock annotation) wasted bits on the logits of
            # an all-convolutional head (SqueezeNet: 7x coarser than needed).
            if _annotated(node):
                node.meta[_ANNOTATION].output_qspec = self.qspec
            else:
                self.annotate_own(node, [producer], self.qspec)
        elif _annotated(node) or not isinstance(producer, torch.fx.Node):
            return
        elif target in _OWN_SCALE_OPS:
            self.annotate_own(node, list(node.args), self.qspec)
        elif target in _FIXED_SCALE_OPS:
            scale, zero_point = _FIXED_SCALE_OPS[target]
            fixed = FixedQParamsQuantizationSpec(
                dtype=torch.int8, scale=scale, zero_point=zero_point, quant_min=-128, quant_max=127,
                qscheme=torch.per_tensor_affine,
            )
            self.annotate_own(node, [producer], fixed)
        elif target in SAME_SCALE_OPS or (target in _PAD_OPS and _pads_with_zero(node)):
            self.annotate_shared(node, producer)

    def annotate_relu(self, node: torch.fx.Node, producer) -> None:
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

        if isinstance(_output_qspec(producer), SharedQuantizationSpec) and not _annotated(node):
            node.meta[_ANNOTATION] = QuantizationAnnotation(
                input_qspec_map={producer: self.qspec},
                output_qspec=SharedQuantizationSpec((producer, node)),
                _annotated=True,
            )
        elif not self.fuse_activation(node) and not _annotated(node):
            self.annotate_own(node, [producer], self.qspec)

    def edge_qspec(self, node: torch.fx.Node, producer):
        """The qspec of the edge producer -> node: the producer's own quantization where it has one."""
        from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

        if isinstance(producer, torch.fx.Node) and _output_qspec(producer) is not None:
            return SharedQuantizationSpec(producer)
        return self.qspec

    def annotate_own(self, node, inputs, output_qspec) -> None:
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

        inputs = [a for a in inputs if isinstance(a, torch.fx.Node)]
        node.meta[_ANNOTATION] = QuantizationAnnotation(
            input_qspec_map={a: self.edge_qspec(node, a) for a in inputs}, output_qspec=output_qspec, _annotated=True
        )

    def annotate_shared(self, node, producer) -> None:
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

        node.meta[_ANNOTATION] = QuantizationAnnotation(
            input_qspec_map={producer: self.edge_qspec(node, producer)},
            output_qspec=SharedQuantizationSpec((producer, node)),
            _annotated=True,
        )

    def fuse_activation(self, node) -> bool:
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

        producer = node.args[0]
        if not (
            isinstance(producer, torch.fx.Node)
            and producer.target in _FUSES_ACTIVATION
            and len(producer.users) == 1
            and _annotated(producer)
            and _is_plain_qspec(_output_qspec(producer))
        ):
            return False
        inputs = producer.meta[_ANNOTATION].input_qspec_map
        producer.meta[_ANNOTATION] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=None, _annotated=True)
        node.meta[_ANNOTATION] = QuantizationAnnotation(output_qspec=self.qspec, _annotated=True)
        return True


def _annotated(node) -> bool:
    return node.meta.get(_ANNOTATION) is not None and node.meta[_ANNOTATION]._annotated


def qat_fake_quantizers(config, per_channel: bool):
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
def conv_bn_patterns_as_modules() -> Iterator[None]:
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
SAME_SCALE_OPS = {  # ops that move values without computing new ones, and poolings TFLite keeps at one scale
    _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.flatten.using_ints,
    _aten.permute.default, _aten.transpose.int, _aten.t.default, _aten.contiguous.default, _aten.clone.default,
    _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default, _aten.unsqueeze.default,
    _aten.expand.default, _aten.slice.Tensor, _aten.select.int, _aten.channel_shuffle.default,
    _aten.pixel_shuffle.default, _aten.max_pool2d.default, _aten.avg_pool2d.default,
    _aten.adaptive_avg_pool2d.default, _aten.mean.dim, _aten.upsample_nearest2d.vec,
}
_MEAN_OPS = {_aten.adaptive_avg_pool2d.default, _aten.mean.dim}
_PAD_OPS = {_aten.pad.default, _aten.constant_pad_nd.default}


def decompose_for_int8(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
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


def is_relu(node: torch.fx.Node) -> bool:
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


def load_litert():
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

