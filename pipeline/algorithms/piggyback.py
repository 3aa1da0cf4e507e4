"""Piggyback (Mallya, Davis & Lazebnik, ECCV 2018): new tasks on a frozen backbone by learning masks.

Each task learns a real-valued score per backbone weight (Linear and Conv weights outside the task
heads), initialised to ``init`` (paper: 1e-2); the forward pass uses ``W * (score > threshold)``
(paper: 5e-3) and the backward pass treats the threshold as the identity (straight-through
estimator), so ``dL/dscore = dL/d(W * m) * W``. The backbone (weights, biases, BatchNorm) never
changes, so no earlier task can be forgotten; each task also trains its own head and, with
``task_biases``, its own copy of the masked layers' biases (the paper trains its task-specific
layers too). What a task keeps is one bit per weight (``np.packbits``), plus those biases.

Difference from the paper: the weight of largest |w| in each output channel is always kept, so every
task's int8 model has the backbone's per-channel (and per-tensor) weight scales and its weight bytes
are the backbone's bytes or zero; that is what lets the bundle ship the backbone once plus each
task's mask, coded as the weights it drops (``encode_masked_models``; decoder:
``edgec.ondevice.tasks``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from edgec.base.errors import InputError
from edgec.ondevice import mask_codec


def scale_keepers(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the weight of largest |w| in each output channel (row 0 of ``weight``)."""
    flat = weight.detach().abs().reshape(weight.shape[0], -1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.arange(flat.shape[0]), flat.argmax(dim=1)] = True
    return keep.view_as(weight)


class _MaskedWeight(torch.autograd.Function):
    """``weight * ((scores > threshold) | keep)`` forward; straight-through backward:
    ``dL/dscores = dL/d(masked weight) * weight`` (the threshold is treated as the identity)."""

    @staticmethod
    def forward(ctx, scores, weight, threshold, keep):
        ctx.save_for_backward(weight)
        return weight * ((scores > threshold) | keep)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad * weight, None, None, None


def masked_weight(scores: torch.Tensor, weight: torch.Tensor, threshold: float, keep: torch.Tensor) -> torch.Tensor:
    """The frozen ``weight`` masked by ``(scores > threshold) | keep``, differentiable in ``scores``
    through the straight-through estimator (one fused autograd node: no per-step float mask)."""
    return _MaskedWeight.apply(scores, weight.detach(), threshold, keep)


def keep_penalty(scores, init: float) -> torch.Tensor:
    """``sum(max(0, init - score))`` over every score: a pull back up on the scores that training pushed
    below their initial value, so a mask drops only the weights its task keeps pushing down (each
    dropped weight costs transport bytes: the bundle ships the weights a mask drops)."""
    return sum(torch.relu(init - s).sum() for s in scores)


class MaskedTaskView(nn.Module):
    """The model with the named backbone weights masked by this task's learned scores, seen through
    the task's output columns. The scores (and, with ``task_biases``, a copy of each masked layer's
    bias that this task trains as its own, as the paper trains its task-specific layers) are this
    module's parameters, so the training loop's best-epoch snapshot keeps them; the model's own
    weights are never written. Modules in ``frozen_norms`` stay in eval mode (the frozen backbone's
    BatchNorm statistics must not move).

    The scores are stored in units of ``score_unit`` (score = stored value x ``score_unit``): Adam's
    step is the same size whatever the gradient's scale, so storing them in units of ``mask_lr / lr``
    makes the one optimizer at ``lr`` move them at ``mask_lr``, without a per-step rescaling pass."""

    def __init__(self, model: nn.Module, columns: tuple[int, int], names: list[str], init: float, threshold: float,
                 frozen_norms=(), *, score_unit: float = 1.0, task_biases: bool = False):
        super().__init__()
        params = dict(model.named_parameters())
        self.model = model
        self.columns = columns
        self.names = list(names)
        self.init, self.threshold = init / score_unit, threshold / score_unit  # in the stored units
        self.scores = nn.ParameterList([nn.Parameter(torch.full_like(params[n].detach(), self.init)) for n in self.names])
        own_biases = (n.rsplit(".", 1)[0] + ".bias" for n in self.names) if task_biases else ()  # hidden.0.bias
        self.bias_names = [b for b in own_biases if b in params]
        self.biases = nn.ParameterList([nn.Parameter(params[b].detach().clone()) for b in self.bias_names])
        self._weights = [params[n] for n in self.names]
        self._keep = [scale_keepers(params[n]) for n in self.names]
        self._frozen = list(frozen_norms)

    def forward(self, x):
        for m in self._frozen:
            m.eval()
        replaced = {n: masked_weight(s, w, self.threshold, k)
                    for n, w, s, k in zip(self.names, self._weights, self.scores, self._keep)}
        replaced.update(zip(self.bias_names, self.biases))
        out = functional_call(self.model, replaced, (x,), strict=False)
        return out[:, self.columns[0]:self.columns[1]]

    def keep_penalty(self) -> torch.Tensor:
        """:func:`keep_penalty` of the scores in their stored units (its gradient on the same scale
        as the straight-through one's)."""
        return keep_penalty(self.scores, self.init)

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        """The learned binary masks (bool tensors)."""
        return {n: (s > self.threshold) | k for n, s, k in zip(self.names, self.scores, self._keep)}

    @torch.no_grad()
    def task_biases(self) -> dict[str, torch.Tensor]:
        """This task's own biases (empty without ``task_biases``)."""
        return {n: b.detach().clone() for n, b in zip(self.bias_names, self.biases)}


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """One bit per weight (uint8, ``np.packbits`` order of the flattened mask)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().astype(bool).reshape(-1)))


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy().astype(np.uint8), count=n)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


@torch.no_grad()
def apply_masks(model: nn.Module, packed: Mapping[str, torch.Tensor],
                biases: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """``model`` (in place) with each named weight multiplied by its packed binary mask and, where
    the task has its own biases, those biases in place of the backbone's."""
    params = dict(model.named_parameters())
    for n, bits in packed.items():
        params[n].mul_(unpack_mask(bits, params[n].shape).to(params[n].dtype))
    for n, b in (biases or {}).items():
        if n not in params or tuple(b.shape) != tuple(params[n].shape):
            raise InputError(f"checkpoint: the piggyback task bias {n!r} does not match the model (shape "
                             f"{tuple(b.shape)}); rebuild the checkpoint with the learn stage that made it")
        params[n].copy_(b)
    return model


def mask_density(packed: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> float:
    """Share of the masked weights a task keeps."""
    kept = sum(int(unpack_mask(b, shapes[n]).sum()) for n, b in packed.items())
    return kept / max(1, sum(int(np.prod(shapes[n])) for n in packed))


# --- transport: the task models as the backbone file + one bit per weight byte ------------------------


def encode_masked_models(base: bytes, base_name: str, files: Mapping[str, bytes]) -> bytes:
    """The tasks transport payload (format and decoder: ``edgec.ondevice.tasks``) of ``files``, each
    rebuilt from ``base`` (the unmasked backbone's model file) as ``mode = "bitmask"``: inside the
    byte ranges where some file zeroes a byte of the base (the masked weight buffers), a mask says
    whether the file keeps the base's byte, coded as its flips against all ones or the previous
    file's mask, in whichever coding and position order compresses smallest
    (``edgec.ondevice.mask_codec``); the rest
    (biases, activation scales that differ between the files) is a byte-wise residual per file,
    nearly all zeros, after the runs of scales that follow one ratio are predicted from the base's
    (``scaled_runs``). The payload is decoded again before it is kept."""
    from edgec.ondevice import tasks as fmt

    from .tasks_payload import TasksPayloadWriter, level_regions

    base_arr = np.frombuffer(base, dtype=np.uint8)
    same = {name: data for name, data in files.items() if len(data) == len(base)}
    zeroed = np.ones(len(base), dtype=np.uint8)
    for data in same.values():
        zeroed[(np.frombuffer(data, dtype=np.uint8) == 0) & (base_arr != 0)] = 2
    regions = level_regions(zeroed)
    positions = fmt.region_positions(regions, len(base))
    writer = TasksPayloadWriter(base, base_name)
    orders = {o: mask_codec.position_order(o, base_arr[positions].tobytes()) for o in mask_codec.ORDERS}
    rebuilt, residuals, previous = {}, [], None
    for i, (name, data) in enumerate(same.items()):
        arr = np.frombuffer(data, dtype=np.uint8)
        keep = np.ones(len(base), dtype=bool)
        keep[positions] = (arr[positions] != 0) | (base_arr[positions] == 0)  # a byte the file zeroes is dropped
        scaled = scaled_runs(arr, base_arr)
        for start, count, _ in scaled:
            keep[start:start + 4 * count] = True  # predicted from the base's words, not masked
        predicted = fmt.apply_scaled(np.where(keep, base_arr, 0).astype(np.uint8), scaled)
        residuals.append((arr - predicted).astype(np.uint8).tobytes())
        rebuilt[name] = {"mode": "bitmask", "index": i, **_coded_mask(writer, keep[positions], previous, orders),
                         **({"scaled": scaled} if scaled else {})}
        previous = keep[positions]
    if same:
        writer.header["regions"] = regions
        writer.header["bit_residuals"] = writer.add(b"".join(residuals))
    return writer.finish(files, rebuilt)


MIN_SCALED_WORDS = 8  # shorter runs cost more header than they save


def scaled_runs(data: np.ndarray, base: np.ndarray, rtol: float = 1e-5) -> list[list]:
    """``[start, count, ratio]`` of each run of at least MIN_SCALED_WORDS float32 words (4-aligned)
    where ``data`` differs from ``base`` and most words are ``base``'s times one common ratio
    (``edgec.ondevice.tasks.apply_scaled``; the residual corrects the rest): a task's bias scales,
    which are the base's times the ratio of the two files' activation scales."""
    n = len(data) // 4
    got, had = data[:4 * n].view("<f4"), base[:4 * n].view("<f4")
    differ = np.flatnonzero(data[:4 * n].view("<u4") != base[:4 * n].view("<u4"))
    runs = []
    for words in np.split(differ, np.flatnonzero(np.diff(differ) > 1) + 1):
        if len(words) < MIN_SCALED_WORDS:
            continue
        with np.errstate(all="ignore"):
            ratios = got[words].astype(np.float64) / had[words]
            ratio = np.float32(np.median(ratios))
            normal = _normal(had[words]) & _normal(had[words] * ratio)  # no NaN or subnormal arithmetic
        if normal.all() and np.mean(np.abs(ratios - ratio) <= rtol * abs(ratio)) >= 0.5:
            runs.append([int(words[0]) * 4, len(words), float(ratio)])
    return runs


def _normal(words: np.ndarray) -> np.ndarray:
    """Finite float32 values of normal size (the same product on every CPU, arm64 included)."""
    return np.isfinite(words) & (np.abs(words) >= np.finfo(np.float32).tiny)


def _coded_mask(writer, kept: np.ndarray, previous: np.ndarray | None, orders: Mapping[str, np.ndarray]) -> dict:
    """``kept``'s smallest coding (its flips against all ones or ``previous``, in each position
    order of ``orders``) as a payload section; the file entry's keys that describe it."""
    refs = {"ones": ~kept, **({} if previous is None else {"previous": kept ^ previous})}
    candidates = []
    for ref, flips in refs.items():
        for order, perm in orders.items():
            for coding in mask_codec.CODINGS:
                raw, count = mask_codec.encode(flips[perm], coding)
                candidates.append(({"ref": ref, "order": order, "coding": coding, "flip_count": count}, raw))
    meta, section = writer.add_smallest(candidates)
    return {**meta, "flips": section}
