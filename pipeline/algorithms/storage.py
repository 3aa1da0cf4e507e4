"""Model size before export, counted two ways (what a device downloads is measured, not counted).

- ``dense_fp32_bytes``: 4 bytes per parameter, the baseline Deep Compression reports (LeNet-300-100:
  266,610 parameters = 1,066,440 bytes, the paper's "1070 KB"). Floating buffers the deployed model
  also needs (BatchNorm running statistics) are counted apart by ``buffer_fp32_bytes``.
- ``deep_compression_bytes``: Han's storage format computed exactly from the weights (relative
  sparse index with filler zeros, codebook indices, codebooks, Huffman coding of both streams). It
  is an estimate: nothing writes this format and a device would have to decode it before inference.

What a device downloads is the exported model's transport payload, ``model.<ext>.edgt``, encoded by
the one weight codec (``transport_codec``); the bundle writer records its size as ``transport_bytes``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from torch import nn

from edgec.base.errors import ConfigError, InputError

DEFAULT_INDEX_BITS = {"conv": 8, "linear": 5}


def dense_fp32_bytes(model: nn.Module) -> int:
    """4 bytes per parameter (weights, biases, normalisation scales and shifts)."""
    return 4 * sum(p.numel() for p in model.parameters())


def buffer_fp32_bytes(model: nn.Module) -> int:
    """4 bytes per element of the floating buffers (BatchNorm running mean and variance)."""
    return 4 * sum(b.numel() for b in model.buffers() if b.is_floating_point())


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def stored_positions(a: np.ndarray) -> np.ndarray:
    """Flat indices of the entries whose bits are not all zero (so -0.0 counts as stored)."""
    return np.flatnonzero(_bits(a.ravel()) != 0)


def codebook_indices(values: np.ndarray, codebook: np.ndarray, name: str) -> np.ndarray:
    """Index of each value in ``codebook``, matched bit for bit; ValueError if one is missing."""
    keys = _bits(codebook)
    wanted = _bits(values.astype(codebook.dtype))
    if not len(keys):
        if len(wanted):
            raise ValueError(f"{name}: {len(wanted)} weights but an empty codebook")
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    index = order[np.searchsorted(keys[order], wanted).clip(max=len(keys) - 1)]
    missing = int(np.sum(keys[index] != wanted))
    if missing:
        raise ValueError(f"{name}: {missing} weights are not values of its codebook")
    return index


def huffman_code_lengths(counts: Mapping[Hashable, int]) -> dict[Hashable, int]:
    """Huffman code length in bits of each symbol with a count > 0 (a lone symbol gets 1 bit).

    Written here because no maintained library exposes Huffman code lengths; this is the textbook
    heap construction: merge the two rarest subtrees until one is left, and every merge adds one
    bit to the codes of all symbols inside the merged subtrees.
    """
    order = itertools.count()  # tie-breaker, so heap entries never compare their symbol lists
    heap = [(count, next(order), [symbol]) for symbol, count in counts.items() if count > 0]
    if len(heap) == 1:
        return {heap[0][2][0]: 1}
    lengths = {symbols[0]: 0 for _, _, symbols in heap}
    heapq.heapify(heap)
    while len(heap) > 1:
        count_a, _, a = heapq.heappop(heap)
        count_b, _, b = heapq.heappop(heap)
        for symbol in a + b:
            lengths[symbol] += 1
        heapq.heappush(heap, (count_a + count_b, next(order), a + b))
    return lengths


def relative_index(positions: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Han's relative sparse index of sorted flat ``positions``: ``(runs, filler)`` per stored entry.

    Each entry stores the number of zeros since the previous entry (0 .. 2**index_bits - 1). A gap
    longer than that is bridged by filler entries: a filler skips the maximum run and then stores an
    explicit zero, so it advances ``2**index_bits`` positions. ``filler`` marks those entries.
    """
    span = 2**index_bits
    gaps = np.diff(np.asarray(positions, dtype=np.int64), prepend=-1) - 1
    fillers = gaps // span
    filler = np.ones(int(fillers.sum()) + len(gaps), dtype=bool)
    ends = np.cumsum(fillers + 1) - 1  # each gap's real entry comes after its fillers
    filler[ends] = False
    runs = np.full(len(filler), span - 1, dtype=np.int64)
    runs[ends] = gaps % span
    return runs, filler


def _huffman_bits(symbols: np.ndarray) -> int:
    values, counts = np.unique(symbols, return_counts=True)
    lengths = huffman_code_lengths(dict(zip(values.tolist(), counts.tolist())))
    return sum(int(count) * lengths[value] for value, count in zip(values.tolist(), counts.tolist()))


def deep_compression_bytes(
    state_dict: Mapping[str, torch.Tensor],
    codebooks: Mapping[str, torch.Tensor],
    index_bits: Mapping[str, int] | None = None,
) -> dict:
    """Deep Compression's storage of ``state_dict``, counted exactly per tensor.

    A tensor with a codebook is stored as Han does: its non-zero weights in row-major order, each
    as (codebook index, relative index) with filler zeros where a run of zeros is too long for
    ``index_bits`` (8 for conv, 5 for linear; override per type with ``{"conv": .., "linear": ..}``),
    plus its codebook at 32 bits per entry. The codebook indices and the relative indices are each
    Huffman coded with their own code; a filler's weight is an extra "zero" symbol. Each coded
    stream is rounded up to whole bytes and its canonical Huffman table costs one byte per symbol
    of its alphabet (the paper leaves the tables out). Every other floating tensor (biases,
    BatchNorm) counts 4 bytes per element; integer buffers (``num_batches_tracked``) are not needed
    for inference and are skipped.

    Returns ``{"layers": [row per tensor], "total": {"bytes", "bytes_without_huffman"}}``. A
    shared row has ``tensor, encoding="shared", params, nonzero, fillers, codebook, weight_bits,
    index_bits, bytes_without_huffman, bytes``; ``bytes_without_huffman`` packs each entry in fixed
    ``weight_bits + index_bits`` (``weight_bits`` covers the codebook plus the filler symbol).
    """
    bits_by_type = dict(DEFAULT_INDEX_BITS)
    for kind, value in (index_bits or {}).items():
        if kind not in bits_by_type:
            raise ConfigError(f"index bits are set per layer type ('conv', 'linear'), got {kind!r}")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
            raise ConfigError(f"index bits must be an integer from 1 to 16, got {value!r}")
        bits_by_type[kind] = value
    unknown = sorted(set(codebooks) - set(state_dict))
    if unknown:
        raise InputError(f"codebooks for tensors that are not in the weights: {', '.join(unknown)}")

    rows = []
    for name, tensor in state_dict.items():
        if name not in codebooks:
            if tensor.is_floating_point():
                size = 4 * tensor.numel()
                row = {"tensor": name, "encoding": "fp32", "params": tensor.numel()}
                rows.append(row | {"bytes_without_huffman": size, "bytes": size})
            continue
        array = tensor.detach().cpu().numpy().ravel()
        codebook = codebooks[name].detach().cpu().numpy().astype(array.dtype)
        positions = stored_positions(array)
        ib = bits_by_type["conv" if tensor.dim() > 2 else "linear"]
        runs, filler = relative_index(positions, ib)
        weight_symbols = np.full(len(runs), len(codebook), dtype=np.int64)  # the filler symbol
        try:
            weight_symbols[~filler] = codebook_indices(array[positions], codebook, name)
        except ValueError as e:
            raise InputError(f"cannot count the shared weights: {e}") from None
        alphabet = len(codebook) + int(filler.any())
        weight_bits = max(1, math.ceil(math.log2(max(alphabet, 1))))
        codebook_bytes = 4 * len(codebook)
        huffman = math.ceil(_huffman_bits(weight_symbols) / 8) + math.ceil(_huffman_bits(runs) / 8)
        rows.append(
            {
                "tensor": name,
                "encoding": "shared",
                "params": tensor.numel(),
                "nonzero": len(positions),
                "fillers": int(filler.sum()),
                "codebook": len(codebook),
                "weight_bits": weight_bits,
                "index_bits": ib,
                "bytes_without_huffman": math.ceil(len(runs) * (weight_bits + ib) / 8) + codebook_bytes,
                "bytes": huffman + codebook_bytes + alphabet + 2**ib,
            }
        )
    total = {key: sum(row[key] for row in rows) for key in ("bytes", "bytes_without_huffman")}
    return {"layers": rows, "total": total}
