"""Keep chosen ops of an onnxruntime QDQ int8 model in float: the ONNX side of selective mixed precision.

``quantize_static(nodes_to_exclude=...)`` leaves a node unquantized, but the next quantized node
still quantizes its output, and onnxruntime fuses ``DequantizeLinear -> op -> QuantizeLinear``
back into the int8 op. What stays float is an op's output tensor: the named node and the nodes
that read its outputs are excluded together (as ``float_ops_pt2e`` does for TFLite).
"""

from __future__ import annotations

from collections.abc import Collection

import onnx


def nodes_to_exclude(model: onnx.ModelProto, names: Collection[str]) -> list[str]:
    """The node names ``quantize_static`` must leave in float so that the outputs of ``names`` stay float."""
    named = [node for node in model.graph.node if node.name in set(names)]
    outputs = {out for node in named for out in node.output}
    readers = [node for node in model.graph.node if outputs.intersection(node.input)]
    return sorted({node.name for node in named + readers if node.name})
