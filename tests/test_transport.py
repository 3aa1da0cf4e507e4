"""Transport payload: exact round trips (synthetic and real int8 TFLite), damage is always caught."""

import lzma
from types import SimpleNamespace

import numpy as np
import pytest

from edgec.ondevice import transport
from edgec.ondevice.transport import TransportError, decode, decode_runs, encode_runs
from edgec.ondevice.verify import _check_transport
from edgec.pipeline.algorithms.transport_codec import describe, encode_plain, encode_transport

INT8, INT32, FLOAT32 = 9, 2, 0


def _tflite(tensors):
    """A TFLite flatbuffer holding ``tensors``: [(int8/int32/float array, scales or None)]."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT()]  # buffer 0: the empty buffer, as converters write it
    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = [], [], [], []
    for i, (array, scales) in enumerate(tensors):
        buf = schema.BufferT()
        buf.data = np.frombuffer(np.ascontiguousarray(array).tobytes(), dtype=np.uint8)
        model.buffers.append(buf)
        t = schema.TensorT()
        t.name = f"t{i}".encode()
        t.shape = np.array(array.shape, dtype=np.int32)
        t.type = {np.dtype(np.int8): INT8, np.dtype(np.int32): INT32, np.dtype(np.float32): FLOAT32}[array.dtype]
        t.buffer = len(model.buffers) - 1
        if scales is not None:
            q = schema.QuantizationParametersT()
            q.scale = np.asarray(scales, dtype=np.float32)
            q.zeroPoint = np.zeros(len(scales), dtype=np.int64)
            q.quantizedDimension = 0
            t.quantization = q
        graph.tensors.append(t)
    activation = schema.TensorT()  # an int8 tensor without data (an activation) is left alone
    activation.name, activation.shape, activation.type, activation.buffer = b"act", np.array([1, 4], np.int32), INT8, 0
    graph.tensors.append(activation)
    model.subgraphs = [graph]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _shared_weight(rng, rows, cols, codebook, density, empty_rows=(), divisor=127.0):
    """int8 weights as an int8 converter writes a pruned, weight-shared layer: per-row scale
    ``max |w| / divisor``, value ``rint(w / scale)``."""
    index = rng.integers(0, len(codebook), size=(rows, cols))
    w = np.where(rng.random((rows, cols)) < density, codebook[index], 0).astype(np.float32)
    w[list(empty_rows)] = 0
    amax = np.abs(w).max(axis=1)
    scales = np.where(amax > 0, amax / np.float32(divisor), np.float32(2.0**-12)).astype(np.float32)
    q = np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


@pytest.fixture
def synthetic():
    rng = np.random.default_rng(0)
    cb1 = np.sort(rng.normal(0, 0.1, 32)).astype(np.float32)
    cb2 = rng.normal(0, 0.3, 16).astype(np.float32)  # unsorted, as centroid fine-tuning may leave it
    w1, s1 = _shared_weight(rng, 60, 200, cb1, 0.08, empty_rows=(3, 17))
    w2, s2 = _shared_weight(rng, 10, 60, cb2, 0.3)
    dense = rng.integers(-127, 128, size=(8, 16)).astype(np.int8)  # no codebook fits: sparse or as is
    per_tensor = np.where(rng.random(300) < 0.1, rng.integers(-127, 128, 300), 0).astype(np.int8)
    bias = rng.integers(-5000, 5000, size=60).astype(np.int32)
    model = _tflite([(w1, s1), (bias, None), (w2, s2), (dense, np.ones(8, np.float32)),
                     (per_tensor, np.array([0.02], np.float32)), (rng.random(7).astype(np.float32), None)])
    return model, [cb1, cb2]


def test_runs_round_trip():
    for positions in ([], [0], [254], [255], [0, 1, 2], [3, 300, 301, 1000, 70000]):
        assert decode_runs(encode_runs(np.array(positions, dtype=np.int64))).tolist() == positions


def test_tflite_round_trip_is_exact_and_uses_the_codebooks(synthetic):
    model, codebooks = synthetic
    payload = encode_transport(model, codebooks)
    assert decode(payload) == model
    info = describe(payload)
    assert info["tensors"].count("shared") == 2, info
    assert len(payload) < len(encode_plain(model)) < len(model)
    assert len(payload) < len(encode_transport(model, []))  # the codebooks are what pays


def test_codebook_that_does_not_fit_is_not_used(synthetic):
    model, codebooks = synthetic
    wrong = [c + np.float32(0.0123) for c in codebooks]
    payload = encode_transport(model, wrong)
    assert decode(payload) == model
    assert "shared" not in describe(payload)["tensors"]


@pytest.mark.parametrize("data", [b"", b"\x00", b"not a model at all" * 50, bytes(range(256)) * 40])
def test_any_file_round_trips(data):
    payload = encode_transport(data, [])
    assert decode(payload) == data


def test_every_flipped_byte_is_caught(synthetic):
    model, codebooks = synthetic
    payload = encode_transport(model, codebooks)
    for i in range(len(payload)):
        damaged = bytearray(payload)
        damaged[i] ^= 0x41
        with pytest.raises(TransportError):
            decode(bytes(damaged))
    with pytest.raises(TransportError):
        decode(payload[:-1])
    with pytest.raises(TransportError):
        decode(payload + b"\x00")
    with pytest.raises(TransportError, match="magic"):
        decode(b"\xfd7zXZ\x00" + payload[6:])


def test_newer_version_is_refused(synthetic):
    model, _ = synthetic
    payload = bytearray(encode_plain(model))
    payload[4] = transport.VERSION + 1
    with pytest.raises(TransportError, match="version"):
        decode(bytes(payload))


def test_verify_checks_the_payload(tmp_path, synthetic):
    model, codebooks = synthetic
    (tmp_path / "model.tflite").write_bytes(model)
    bundle = SimpleNamespace(path=str(tmp_path), model_path=str(tmp_path / "model.tflite"),
                             manifest={"model_file": "model.tflite", "size": {"transport_file": "model.tflite.edgt"}})
    payload = encode_transport(model, codebooks)
    (tmp_path / "model.tflite.edgt").write_bytes(payload)
    assert _check_transport(bundle)["ok"]

    damaged = bytearray(payload)
    damaged[len(damaged) // 2] ^= 1
    (tmp_path / "model.tflite.edgt").write_bytes(bytes(damaged))
    check = _check_transport(bundle)
    assert not check["ok"] and "does not decode" in check["detail"]

    other = bytearray(model)
    other[len(other) // 3] ^= 1
    (tmp_path / "model.tflite.edgt").write_bytes(encode_transport(bytes(other), codebooks))  # a valid payload, another file
    check = _check_transport(bundle)
    assert not check["ok"] and "does not decode to model.tflite" in check["detail"]

    (tmp_path / "model.tflite.edgt").write_bytes(lzma.compress(model))  # not an edgec payload
    check = _check_transport(bundle)
    assert not check["ok"] and "bad magic" in check["detail"]


@pytest.mark.slow
def test_real_int8_tflite_of_a_pruned_shared_model(tmp_path):
    """The converter's own layout: per-channel int8 FULLY_CONNECTED weights, int32 biases."""
    import torch
    from torch import nn

    from edgec.pipeline.algorithms.pruning import LayerSparsity, apply_masks, compute_masks
    from edgec.pipeline.algorithms.sharing import apply_sharing, cluster_weights
    from edgec.targets.tflite_export import export_tflite

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    apply_masks(model, compute_masks(model, LayerSparsity({"linear": 0.9})))
    codebooks, assignments = cluster_weights(model, bits=4)
    apply_sharing(model, codebooks, assignments)
    x = torch.randn(64, 1, 16, 16)
    export_tflite(model, x[:1], tmp_path / "m.tflite", precision="int8", calibration=x.numpy())
    data = (tmp_path / "m.tflite").read_bytes()

    payload = encode_transport(data, [c.numpy() for c in codebooks.values()])
    assert decode(payload) == data
    assert "shared" in describe(payload)["tensors"]  # the big layer at least; the small one may go either way
    assert len(payload) < len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
