"""Keep chosen ops of an onnxruntime QDQ int8 model in float: the ONNX side of selective mixed precision.

``quantize_static(nodes_to_exclude=...)`` leaves a node unquantized, but the next quantized node
still quantizes its output, and onnxruntime fuses ``DequantizeLinear -> op -> QuantizeLinear``
back into the int8 op. What stays float is an op's output tensor: the named node and the nodes
that read its output are excluded together, followed through the ops that fuse into a producer or
only move values (Relu, Clip, reshapes, max pooling), as ``float_ops_pt2e`` does for TFLite.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx

_PASS_THROUGH = {"Relu", "Clip", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool"}


def nodes_to_exclude(model: onnx.ModelProto, names: Collection[str]) -> list[str]:
    """The node names ``quantize_static`` must leave in float so that the outputs of ``names`` stay float."""
    nodes = list(model.graph.node)
    excluded = [node for node in nodes if node.name in set(names)]
    frontier = excluded
    while frontier:
        outputs = {out for node in frontier for out in node.output}
        readers = [node for node in nodes if outputs.intersection(node.input) and node not in excluded]
        excluded += readers
        frontier = [node for node in readers if node.op_type in _PASS_THROUGH]
    return sorted({node.name for node in excluded if node.name})
