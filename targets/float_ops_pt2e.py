"""Keep chosen ops of a PT2E int8 model in float: the TFLite side of selective mixed precision.

An op that a PT2E quantizer leaves unannotated is not quantized: its inputs reach it through
DEQUANTIZE, it computes in float32, and the next int8 op quantizes its output again. litert-torch
lowers exactly that (``DEQUANTIZE -> float op -> QUANTIZE``), and the file keeps its int8 inputs
and outputs. :func:`keep_ops_float` wraps edgec's full-integer quantizer so that, after it has
annotated the graph, the ops of the named torch modules lose their annotation, and the
annotations that pointed at them (shared scales, fused activations, the graph's int8 I/O) are
given scales of their own.

Ops are named by torch module path (``features.3.conv``), the names the int8 diagnosis
(``diagnose.int8_layer_errors``) gives TFLite layers; an op of the model's own ``forward`` (no
submodule) cannot be named and stays int8.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from .int8_quantizer import SAME_SCALE_OPS, is_relu

_ANNOTATION = "quantization_annotation"  # the node.meta key PT2E quantizers write


def keep_ops_float(quantizer, float_ops: Collection[str]):
    """A quantizer that annotates like ``quantizer`` except for the ops of the modules ``float_ops``."""
    names = frozenset(float_ops)
    base = type(quantizer)

    class FloatOpsQuantizer(base):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            floats = float_nodes(model.graph, names)
            _leave_float(model.graph, floats, self.global_config.input_activation)
            self.float_layers = sorted({_module_path(n) for n in floats} - {""})  # "": the model's own forward
            return model

    wrapped = FloatOpsQuantizer()
    wrapped.__dict__.update(quantizer.__dict__)  # the same settings: global config and edgec's own annotations
    return wrapped


def float_nodes(graph: torch.fx.Graph, names: Collection[str]) -> set[torch.fx.Node]:
    """The computing nodes whose innermost torch module is one of ``names`` or inside one, and the
    nodes that read their outputs: an op alone between DEQUANTIZE and QUANTIZE is what an int8 op
    computes (the converter fuses it back to int8), so what stays float is an op's output tensor,
    followed through a ReLU / ReLU6 (fused into the op) and ops that only move values (reshape, pooling)
    to the ops that compute on it."""
    found = set()
    for node in graph.nodes:
        path = _module_path(node)
        if node.op != "call_function" or not path:
            continue
        if any(path == name or path.startswith(name + ".") for name in names):
            found.add(node)
    readers, frontier = set(), found
    while frontier:  # through ops that fuse into the op before them or only move its values (ReLU, reshape)
        users = {user for node in frontier for user in node.users if user.op == "call_function"} - readers - found
        readers |= users
        frontier = {user for user in users if is_relu(user) or user.target in SAME_SCALE_OPS}
    return found | readers


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _leave_float(graph: torch.fx.Graph, floats: set[torch.fx.Node], qspec) -> None:
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    def points_at_float(spec) -> bool:
        if not isinstance(spec, SharedQuantizationSpec):
            return False
        target = spec.edge_or_node
        return (target[1] if isinstance(target, tuple) else target) in floats

    for node in floats:
        node.meta[_ANNOTATION] = QuantizationAnnotation(_annotated=True)  # annotated, with nothing quantized
        for producer in node.all_input_nodes:
            annotation = producer.meta.get(_ANNOTATION)
            # a conv whose fused activation is now float: its own output must be quantized
            if producer not in floats and annotation is not None and annotation.input_qspec_map \
                    and annotation.output_qspec is None:
                annotation.output_qspec = qspec
    for node in graph.nodes:
        if node in floats:
            continue
        annotation = node.meta.get(_ANNOTATION)
        if annotation is not None:
            if points_at_float(annotation.output_qspec):
                annotation.output_qspec = qspec
            for key, spec in annotation.input_qspec_map.items():
                if points_at_float(spec):
                    annotation.input_qspec_map[key] = qspec
        if node.op == "placeholder" and any(user in floats for user in node.users):
            if annotation is None:
                node.meta[_ANNOTATION] = annotation = QuantizationAnnotation(_annotated=True)
            annotation.output_qspec = annotation.output_qspec or qspec  # the model input stays int8
        elif node.op == "output":
            unquantized = [n for n in node.all_input_nodes if n in floats]
            if unquantized:  # the model output stays int8
                if annotation is None:
                    node.meta[_ANNOTATION] = annotation = QuantizationAnnotation(_annotated=True)
                annotation.input_qspec_map.update(dict.fromkeys(unquantized, qspec))
