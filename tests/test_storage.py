import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgec
from edgec.base.errors import ConfigError, InputError
from edgec.pipeline.algorithms.pruning import LayerSparsity, apply_masks, compute_masks
from edgec.pipeline.algorithms.sharing import apply_sharing, cluster_weights
from edgec.pipeline.algorithms.storage import (
    buffer_fp32_bytes,
    deep_compression_bytes,
    dense_fp32_bytes,
    huffman_code_lengths,
    relative_index,
)
from edgec.zoo import LeNet300100


def lenet_300_100_compressed(bits: int = 6):
    """Random LeNet-300-100 pruned to the paper's keep ratios (ip1 8%, ip2 9%, ip3 26%) and shared."""
    torch.manual_seed(0)
    model = LeNet300100((1, 28, 28), 10)
    masks = compute_masks(model, LayerSparsity({"fc1": 0.92, "fc2": 0.91, "fc3": 0.74}))
    apply_masks(model, masks)
    codebooks, assignments = cluster_weights(model, bits)
    apply_sharing(model, codebooks, assignments)
    return model, masks, codebooks


def test_dense_fp32_bytes_counts_parameters_and_buffers_apart():
    model = LeNet300100((1, 28, 28), 10)
    assert dense_fp32_bytes(model) == 4 * (784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10) == 1_066_440
    assert buffer_fp32_bytes(model) == 0
    bn = nn.BatchNorm1d(7)
    assert dense_fp32_bytes(bn) == 4 * 14
    assert buffer_fp32_bytes(bn) == 4 * 14  # running mean and var; num_batches_tracked is an integer


def test_huffman_code_lengths():
    # CLRS's example: a:45 b:13 c:12 d:16 e:9 f:5 -> a 1 bit, b c d 3 bits, e f 4 bits (224 bits).
    lengths = huffman_code_lengths({"a": 45, "b": 13, "c": 12, "d": 16, "e": 9, "f": 5})
    assert lengths == {"a": 1, "b": 3, "c": 3, "d": 3, "e": 4, "f": 4}
    assert huffman_code_lengths({"x": 7, "unused": 0}) == {"x": 1}
    assert huffman_code_lengths({}) == {}


def test_relative_index_inserts_fillers():
    # 2-bit runs (0..3 zeros). Gap of 6 zeros before 9: filler after 3 zeros (at 6), then run 2.
    runs, filler = relative_index(np.array([1, 2, 9, 10, 15]), 2)
    assert runs.tolist() == [1, 0, 3, 2, 0, 3, 0]
    assert filler.tolist() == [False, False, True, False, False, True, False]
    runs, filler = relative_index(np.array([8]), 2)  # exactly two spans of 4 before position 8
    assert runs.tolist() == [3, 3, 0] and filler.tolist() == [True, True, False]


def test_deep_compression_bytes_by_hand():
    # A 2x8 linear weight, row-major positions 0..15, non-zeros at 1, 2, 9, 10, 15 and a 3-entry codebook.
    codebook = torch.tensor([-0.5, 0.25, 1.0])
    weight = torch.zeros(16)
    weight[[1, 2, 9, 10, 15]] = torch.tensor([0.25, 0.25, -0.5, 0.25, 1.0])
    state = {"w": weight.view(2, 8), "b": torch.zeros(2), "steps": torch.tensor(3)}
    report = deep_compression_bytes(state, {"w": codebook}, index_bits={"linear": 2})
    # Relative index with 2 bits (runs 0..3): runs 1, 0, [filler 3], 2, 0, [filler 3], 0 -> 7 entries.
    # Weight symbols (codebook index, 3 = filler zero): 1, 1, 3, 0, 1, 3, 2.
    # Fixed width: alphabet of 3 + filler = 4 symbols -> 2 bits; 7 entries * (2 + 2) bits = 28 bits
    #   -> 4 bytes, + codebook 3 * 4 bytes = 16 bytes.
    # Huffman, weights {1: 3, 3: 2, 0: 1, 2: 1}: merge 0+2 (2), then 3 + (0,2) (4), then 1 + rest:
    #   lengths 1:1, 3:2, 0:3, 2:3 -> 3*1 + 2*2 + 1*3 + 1*3 = 13 bits -> 2 bytes.
    # Huffman, runs {0: 3, 3: 2, 1: 1, 2: 1}: the same counts -> 13 bits -> 2 bytes.
    # Tables: one byte per symbol, 4 weight symbols + 2**2 run symbols = 8 bytes.
    # Total 2 + 2 + 12 (codebook) + 8 = 24 bytes.
    w_row, b_row = report["layers"]
    assert w_row == {
        "tensor": "w",
        "encoding": "shared",
        "params": 16,
        "nonzero": 5,
        "fillers": 2,
        "codebook": 3,
        "weight_bits": 2,
        "index_bits": 2,
        "bytes_without_huffman": 16,
        "bytes": 24,
    }
    # The bias is fp32 (2 * 4 bytes); the integer buffer is not counted.
    assert b_row == {"tensor": "b", "encoding": "fp32", "params": 2, "bytes_without_huffman": 8, "bytes": 8}
    assert report["total"] == {"bytes": 32, "bytes_without_huffman": 24}


def test_deep_compression_defaults_and_bad_input():
    conv = torch.zeros(2, 1, 3, 3)
    conv[0, 0, 0, 0] = 1.0
    row = deep_compression_bytes({"c": conv}, {"c": torch.tensor([1.0])})["layers"][0]
    assert row["index_bits"] == 8 and row["weight_bits"] == 1 and row["fillers"] == 0
    with pytest.raises(ConfigError, match="'fc'"):
        deep_compression_bytes({"c": conv}, {}, index_bits={"fc": 4})
    with pytest.raises(ConfigError, match="0"):
        deep_compression_bytes({"c": conv}, {}, index_bits={"conv": 0})
    with pytest.raises(InputError, match="not in its codebook|not values of its codebook"):
        deep_compression_bytes({"c": conv}, {"c": torch.tensor([0.5])})


def test_lenet_300_100_sizes():
    model, _, codebooks = lenet_300_100_compressed()
    estimate = deep_compression_bytes(model.state_dict(), codebooks)["total"]["bytes"]
    assert dense_fp32_bytes(model) / estimate > 30  # the paper: 1070 KB -> 27 KB (40x) on trained weights


# Host modules that may write compressed bytes: the transport payload's encoder and the multi-task
# payload built from its sections. Anything else compressing weights would be a second codec whose
# size is not what a device downloads.
WEIGHT_CODEC_MODULES = {"pipeline/algorithms/transport_codec.py", "pipeline/algorithms/tasks_payload.py"}


def test_one_weight_codec():
    """Only the transport codec compresses: no stage reports a packed size that nothing ships."""
    root = Path(edgec.__file__).resolve().parents[1]
    compressing = {
        path.relative_to(root).as_posix()
        for folder in ("edgec", "pipeline", "targets", "calibration")
        for path in (root / folder).rglob("*.py")
        if re.search(r"\b(lzma|zlib|bz2|gzip)\.compress\(", path.read_text())
    }
    assert compressing == WEIGHT_CODEC_MODULES
