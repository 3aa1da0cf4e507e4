"""Quantization-aware training graphs (PT2E) shared by the qat stage and the int8 exporters.

The qat stage fine-tunes a model through the int8 quantization the exporters apply
(litert-torch's PT2E quantizer with edgec's annotations, ``int8_quantizer.full_integer_quantizer``,
in its QAT form), inserted by ``prepare_qat_pt2e`` as fake-quantize modules: weights per channel,
activation ranges tracked by moving-average min/max, each conv + BatchNorm pair trained as it
will be folded (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"). What the exporters need from that training besides the
weights is the fake-quantizers' state (ranges, scales, zero points): the qat stage stores it in
the checkpoint (:func:`qat_extension`); an exporter rebuilds the same graph from the model,
loads that state, refusing one that does not fit the graph (:func:`restore_qat`), and converts
it (:func:`convert_qat`): int8 TFLite through litert-torch, QDQ ONNX through ``torch.onnx``, with
no post-training calibration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from edgec.base.errors import ExportError

from .exported import strip_dropout
from .int8_quantizer import capture_graph, full_integer_quantizer, load_litert

_STATE_PREFIX = "activation_post_process_"  # what prepare_qat_pt2e names its fake-quantize modules
WEIGHT_BITS = {"tflite": 8, "onnx": 7}  # the int8 weights each format's export makes (onnx_export: reduce_range)


def weight_bits_for(target_format: str) -> int:
    """The weight bits a target's int8 export uses, so QAT trains on the grid the file will have."""
    return WEIGHT_BITS.get(target_format, 8)


def prepare_qat(model: nn.Module, example: torch.Tensor, per_channel: bool = True,
                weight_bits: int = 8) -> torch.fx.GraphModule:
    """The model captured in training mode with fake-quantize modules inserted; its parameters
    keep the model's names (``conv1.weight``), so masks and codebooks address them as before.

    Raises ExportError when the model cannot be captured with a dynamic batch dimension (QAT
    trains on batches) or prepared."""
    load_litert()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model = strip_dropout(model).train()  # BatchNorm is captured in its training form, to fold it while training
    graph, capture, _ = capture_graph(model, example)
    if capture != "strict, dynamic batch":
        raise ExportError(f"quantization-aware training needs a model torch.export captures with a dynamic batch "
                          f"dimension; this one was captured only as {capture!r}")
    try:
        return prepare_qat_pt2e(graph, full_integer_quantizer(per_channel, qat=True, weight_bits=weight_bits))
    except Exception as e:
        raise ExportError(f"preparing the model for quantization-aware training failed: {type(e).__name__}: {e}") from e


class QATModel(nn.Module):
    """A prepared QAT graph as a module the training loop can use: an exported graph refuses
    ``.train()``/``.eval()``, which here switch its BatchNorm ops the PT2E way."""

    def __init__(self, graph: torch.fx.GraphModule):
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> QATModel:
        """Also switches the range observers: ranges are learnt from training batches only, and an
        evaluation (the validation split) neither changes them nor depends on what ran before."""
        from torchao.quantization.pt2e import (
            disable_observer, enable_observer, move_exported_model_to_eval, move_exported_model_to_train,
        )

        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
        self.graph.apply(enable_observer if mode else disable_observer)
        self.training = mode
        return self

    def trained_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The state dict of ``model`` (the module that was prepared) with the weights trained here.
        The graph also holds constants and fake-quantizers; a buffer its forward never reads is not
        in the graph and keeps the model's value."""
        trained = self.graph.state_dict()
        return {name: trained.get(name, value) for name, value in model.state_dict().items()}


def qat_extension(graph: torch.fx.GraphModule, per_channel: bool, weight_bits: int = 8) -> dict[str, Any]:
    """What the checkpoint keeps for the exporters: the quantizer settings and every fake-quantizer's state."""
    state = {k: v.detach().clone() for k, v in graph.state_dict().items() if k.startswith(_STATE_PREFIX)}
    return {"per_channel": per_channel, "weight_bits": weight_bits, "state": state}


def record_weight_bits(extension: Mapping[str, Any]) -> int:
    """The record's weight bits (8 in records from before they were kept), checked."""
    bits = extension.get("weight_bits", 8)
    if type(bits) is not int or bits not in set(WEIGHT_BITS.values()):
        raise ExportError(f"the checkpoint's qat record has weight_bits {bits!r}; expected one of "
                          f"{sorted(set(WEIGHT_BITS.values()))}; rerun the qat stage")
    return bits


def restore_qat(model: nn.Module, example: torch.Tensor, extension: Any) -> torch.fx.GraphModule:
    """The QAT graph of ``model`` with the trained quantization state of ``extension`` (read from a
    checkpoint: checked against the graph before it is loaded), observers frozen."""
    if not isinstance(extension, Mapping) or not isinstance(extension.get("per_channel"), bool) \
            or not isinstance(extension.get("state"), Mapping):
        raise ExportError("the checkpoint's qat record is damaged (expected per_channel and state); rerun the qat stage")
    from torchao.quantization.pt2e import move_exported_model_to_eval

    graph = prepare_qat(model, example, extension["per_channel"], record_weight_bits(extension))
    move_exported_model_to_eval(graph)  # the form the qat stage's training ended in
    with torch.no_grad():
        graph(torch.cat([example, example]))  # sizes the per-channel buffers, which start empty, for the check below
    expected = {k: v for k, v in graph.state_dict().items() if k.startswith(_STATE_PREFIX)}
    state = extension["state"]
    if set(state) != set(expected):
        raise ExportError(f"the checkpoint's qat record has {len(state)} quantizer entries but the model's graph needs "
                          f"{len(expected)}: it was made for another model; rerun the qat stage")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected[name].shape \
                or tensor.dtype != expected[name].dtype or (tensor.is_floating_point() and not torch.isfinite(tensor).all()):
            raise ExportError(f"the checkpoint's qat record entry {name!r} does not fit the model's graph; rerun the qat stage")
    graph.load_state_dict(dict(state), strict=False)
    return QATModel(graph).eval().graph  # observers off: the trained ranges stay as they are


def convert_qat(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The quantized (QDQ) graph: BatchNorm folded into its conv, fake-quantizers turned into
    quantize/dequantize pairs with the trained parameters."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    quantized = convert_pt2e(graph, fold_quantize=False)
    move_exported_model_to_eval(quantized)
    torch.nn.Module.train(quantized, False)  # an exported graph refuses .eval(); litert-torch reads this flag
    return quantized
