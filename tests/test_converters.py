"""Real conversions of tiny models, loaded back by the real runtimes (ai-edge-litert, onnxruntime).

Quality is measured on models trained for a few seconds on scikit-learn's digits (8x8), as top-1
agreement between the exported model and the torch fp32 model on the held-out samples that the torch
model decides clearly (``support.decisive_agreement``: near-ties that CPU kernels swap do not count).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from ai_edge_litert.interpreter import Interpreter
from sklearn.datasets import load_digits
from support import decisive_agreement
from torch import nn

from edgec.calibration.samples import select_calibration_indices
from edgec.base.errors import ExportError
from edgec.targets.onnx_export import export_onnx
from edgec.targets.tflite_export import export_tflite

MIN_AGREEMENT = 0.99


# ---- models -------------------------------------------------------------------------------------


def mlp(features: int = 64) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 10))


def conv_block(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_block(1, 8), conv_block(8, 16))
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class ResidualGAP(nn.Module):
    """A user model: BatchNorm, a residual add and global average pooling."""

    def __init__(self, c: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        y = self.stem(x)
        y = F.relu(y + self.bn(self.conv(y)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class LeNet5(nn.Module):
    """conv20 5x5, maxpool, conv50 5x5, maxpool, fc500, relu, fc10; optionally a ReLU after each
    pooling layer, as edgec's zoo LeNet-5 has (the int8 converter needs care with pool -> relu)."""

    def __init__(self, relu_after_pool: bool = False):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, 10)
        self.act = nn.ReLU() if relu_after_pool else nn.Identity()

    def forward(self, x):
        x = self.act(F.max_pool2d(self.conv1(x), 2))
        x = self.act(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class OddEdges(nn.Module):
    """Starts and ends with ops outside the linear/conv patterns: clamp, a scalar multiply, tanh and a
    division (TFLite has int8 kernels for them), or sin, which TFLite runs in float only."""

    def __init__(self, float_only: bool = False):
        super().__init__()
        self.body = mlp()
        self.float_only = float_only

    def forward(self, x):
        if self.float_only:
            return torch.sin(self.body(torch.sin(x)) * 0.3)
        return torch.tanh(self.body(x.clamp(0, 1) * 0.5)) / 0.7


class FixedBatch(nn.Module):
    """Hard-codes batch 1, so it cannot be captured with a dynamic batch dimension."""

    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        return self.body(x.reshape(1, 64))


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("this model cannot be traced")


# ---- data and training --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """(train images, train labels, held-out images) from scikit-learn's 8x8 digits, in [0, 1]."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    return x[:1200], y[:1200], x[1200:]


def flat(data):
    x, y, x_test = data
    return x.reshape(len(x), -1), y, x_test.reshape(len(x_test), -1)


def train(factory, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    """A seeded model trained for a few seconds. One thread: on a shared 2-core machine, two ran 3-5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = factory()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    try:
        for _ in range(epochs):
            for batch in torch.randperm(len(x)).split(64):
                opt.zero_grad()
                F.cross_entropy(model(xt[batch]), yt[batch]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def trained(digits):
    """name -> (trained model, its data split)."""
    return {
        "mlp": (train(mlp, *flat(digits)[:2], 20), flat(digits)),
        "cnn": (train(SmallCNN, *digits[:2], 10), digits),
    }


def export(exporter, model, x, y, path, precision, **options):
    """Export with the first training sample as the example and 128 stratified calibration samples."""
    calibration = x[select_calibration_indices(y, 128)] if precision == "int8" else None
    return exporter(model, torch.from_numpy(x[:1]), path, precision=precision, calibration=calibration, **options)


# ---- runtimes -----------------------------------------------------------------------------------


def run_tflite(path, x: np.ndarray) -> np.ndarray:
    """Dequantized outputs of a TFLite model, one sample at a time."""
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for sample in x:
        sample = sample[None]
        if inp["dtype"] == np.int8:
            scale, zero_point = inp["quantization"]
            sample = np.clip(np.round(sample / scale) + zero_point, -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], sample)
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"]).astype(np.float32)
        if out["dtype"] == np.int8:
            scale, zero_point = out["quantization"]
            result = (result - zero_point) * scale
        results.append(result[0])
    return np.stack(results)


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def reference(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def dtypes(info) -> list[str]:
    return [t["dtype"] for t in info.inputs + info.outputs]


# ---- TFLite -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_tflite_int8_is_full_integer_agrees_and_leaves_the_model_alone(tmp_path, trained, name):
    model, (x, y, x_test) = trained[name]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]

    info = export(export_tflite, model, x, y, tmp_path / "m.tflite", "int8")

    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not model.training and [type(m) for m in model.modules()] == modules
    interpreter = Interpreter(model_path=str(info.path))
    details = interpreter.get_input_details() + interpreter.get_output_details()
    for spec, detail in zip(info.inputs + info.outputs, details, strict=True):
        scale, zero_point = detail["quantization"]
        assert detail["dtype"] == np.int8 and spec["dtype"] == "int8"
        assert spec["quantization"] == {"scale": pytest.approx(scale), "zero_point": zero_point}
        assert spec["shape"] == detail["shape"].tolist()
    assert info.inputs[0]["layout"] == ("NC" if x.ndim == 2 else "NCHW") and info.outputs[0]["layout"] == "NC"
    assert info.conversion["float_ops"] == []
    assert decisive_agreement(run_tflite(info.path, x_test), reference(model, x_test), "int8") >= MIN_AGREEMENT


def test_tflite_fp16_has_float16_weights_and_float32_io(tmp_path, trained):
    model, (x, y, x_test) = trained["cnn"]
    info = export(export_tflite, model, x, y, tmp_path / "m.tflite", "fp16")
    assert dtypes(info) == ["float32", "float32"]
    assert np.float16 in {d["dtype"] for d in Interpreter(model_path=str(info.path)).get_tensor_details()}
    out, ref = run_tflite(info.path, x_test), reference(model, x_test)
    assert decisive_agreement(out, ref, "fp16") >= MIN_AGREEMENT and np.abs(out - ref).max() < 0.05


def test_tflite_fp32_matches_torch(tmp_path, trained):
    model, (x, y, x_test) = trained["mlp"]
    info = export(export_tflite, model, x, y, tmp_path / "m.tflite", "fp32")
    expected = {"shape": [1, 64], "dtype": "float32", "layout": "NC", "quantization": None}
    assert {k: v for k, v in info.inputs[0].items() if k != "name"} == expected
    assert np.abs(run_tflite(info.path, x_test) - reference(model, x_test)).max() < 1e-4
    assert set(info.runtime_versions) >= {"torch", "litert-torch", "ai-edge-litert"}


def test_tflite_int8_quantizes_residual_add_and_global_pooling(tmp_path, digits):
    x, y, x_test = digits
    model = train(ResidualGAP, x, y, 30)
    info = export(export_tflite, model, x, y, tmp_path / "m.tflite", "int8")
    assert info.conversion["float_ops"] == [] and info.conversion["capture"] == "strict, dynamic batch"
    assert decisive_agreement(run_tflite(info.path, x_test), reference(model, x_test), "int8") >= MIN_AGREEMENT


@pytest.mark.parametrize("float_only, float_ops", [(False, []), (True, ["SIN", "SIN"])])
def test_tflite_int8_io_stays_int8_when_edge_ops_have_no_int8_pattern(tmp_path, digits, float_only, float_ops):
    x, y, x_test = flat(digits)
    model = OddEdges(float_only).eval()
    info = export(export_tflite, model, x, y, tmp_path / "m.tflite", "int8")
    assert dtypes(info) == ["int8", "int8"]
    assert info.conversion["float_ops"] == float_ops  # tanh (fixed 1/128 output scale), mul: int8 kernels
    out, ref = run_tflite(info.path, x_test), reference(model, x_test)
    assert np.abs(out - ref).max() < 0.1 * np.ptp(ref)


def test_tflite_int8_falls_back_to_a_static_batch_capture(tmp_path, digits):
    x, y, _ = flat(digits)
    info = export(export_tflite, FixedBatch().eval(), x, y, tmp_path / "m.tflite", "int8")
    assert info.conversion["capture"] == "strict" and info.conversion["float_ops"] == []
    assert dtypes(info) == ["int8", "int8"]


@pytest.mark.parametrize("relu_after_pool", [False, True])
def test_lenet5_28x28_converts_to_full_integer_tflite_and_int8_onnx(tmp_path, relu_after_pool):
    torch.manual_seed(0)
    model = LeNet5(relu_after_pool).eval()
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    y = np.arange(16) % 10
    tfl = export(export_tflite, model, x, y, tmp_path / "m.tflite", "int8")
    assert dtypes(tfl) == ["int8", "int8"] and tfl.conversion["float_ops"] == []
    assert tfl.inputs[0]["shape"] == [1, 1, 28, 28] and tfl.inputs[0]["layout"] == "NCHW"
    onx = export(export_onnx, model, x, y, tmp_path / "m.onnx", "int8")
    ref = reference(model, x)
    for out in (run_tflite(tfl.path, x), run_onnx(onx.path, x)):
        assert np.abs(out - ref).max() < 0.1 * np.ptp(ref)


# ---- ONNX ---------------------------------------------------------------------------------------


def test_onnx_fp32_has_a_dynamic_batch_and_matches_torch(tmp_path, trained):
    model, (x, y, x_test) = trained["cnn"]
    info = export(export_onnx, model, x, y, tmp_path / "m.onnx", "fp32")
    expected = {"name": "input", "shape": [-1, 1, 8, 8], "dtype": "float32", "layout": "NCHW", "quantization": None}
    assert info.inputs == [expected]
    assert info.outputs[0]["shape"] == [-1, 10] and info.outputs[0]["layout"] == "NC"
    assert np.abs(run_onnx(info.path, x_test) - reference(model, x_test)).max() < 1e-4
    assert set(info.runtime_versions) == {"torch", "onnx", "onnxruntime"}


def test_onnx_fp16_keeps_float32_io(tmp_path, trained):
    model, (x, y, x_test) = trained["cnn"]
    info = export(export_onnx, model, x, y, tmp_path / "m.onnx", "fp16")
    assert dtypes(info) == ["float32", "float32"]
    graph = onnx.load(info.path).graph
    assert {i.data_type for i in graph.initializer if i.dims} == {onnx.TensorProto.FLOAT16}
    out, ref = run_onnx(info.path, x_test), reference(model, x_test)
    assert decisive_agreement(out, ref, "fp16") >= MIN_AGREEMENT and np.abs(out - ref).max() < 0.05


def _per_channel_weight_scales(graph) -> list:
    """Scales of the DequantizeLinear nodes that read int8 weight matrices or kernels."""
    initializers = {i.name: i for i in graph.initializer}
    weights = {n for n, i in initializers.items() if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1}
    return [initializers[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]


@pytest.mark.parametrize(
    "name, method", [("mlp", "minmax"), ("mlp", "percentile"), ("mlp", "entropy"), ("cnn", "minmax")]
)
def test_onnx_int8_is_per_channel_qdq_and_agrees(tmp_path, trained, name, method):
    model, (x, y, x_test) = trained[name]
    info = export(export_onnx, model, x, y, tmp_path / "m.onnx", "int8", calibration_method=method)
    graph = onnx.load(info.path).graph
    scales = _per_channel_weight_scales(graph)
    assert scales and all(s.dims[0] > 1 for s in scales)  # one scale per output channel
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert info.conversion["calibration_method"] == method and info.conversion["calibration_samples"] == 128
    assert decisive_agreement(run_onnx(info.path, x_test), reference(model, x_test), "int8") >= MIN_AGREEMENT
    # 7-bit weights: onnxruntime's x86 kernels without VNNI add u8 x s8 products in 16-bit pairs (onnx_export.py)
    weights = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("weight_quantized")]
    assert weights and max(np.abs(w.astype(np.int16)).max() for w in weights) <= 64
    assert info.conversion["weight_bits"] == 7


def test_onnx_mlp_on_28x28_images_with_flatten(tmp_path):
    torch.manual_seed(0)
    model = mlp(784).eval()
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    info = export(export_onnx, model, x, np.arange(8), tmp_path / "m.onnx", "int8")
    assert info.inputs[0]["shape"] == [-1, 1, 28, 28] and info.inputs[0]["layout"] == "NCHW"
    ref = reference(model, x)
    assert np.abs(run_onnx(info.path, x) - ref).max() < 0.1 * np.ptp(ref)


# ---- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", [export_onnx, export_tflite])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_failed_export_raises_export_error_and_leaves_no_file(tmp_path, exporter, precision):
    path = tmp_path / "out" / "model.bin"
    path.parent.mkdir()
    path.write_bytes(b"an older model")
    x = np.zeros((4, 4), np.float32)
    with pytest.raises(ExportError):
        export(exporter, Broken(), x, np.arange(4), path, precision)
    assert list(path.parent.iterdir()) == []


@pytest.mark.parametrize("exporter", [export_onnx, export_tflite])
def test_int8_needs_well_shaped_calibration(tmp_path, exporter):
    model, example = mlp(4).eval(), torch.zeros(1, 4)
    with pytest.raises(ExportError, match="calibration"):
        exporter(model, example, tmp_path / "m", precision="int8")
    with pytest.raises(ExportError, match="shape"):
        exporter(model, example, tmp_path / "m", precision="int8", calibration=np.zeros((3, 5), np.float32))
    assert list(tmp_path.iterdir()) == []
