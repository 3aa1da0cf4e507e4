"""Real conversions of tiny models, loaded back by the real runtimes (ai-edge-litert, onnxruntime).

Quality is measured on models trained for a few seconds on scikit-learn's digits (8x8), as top-1
agreement between the exported model and the torch fp32 model on held-out samples.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from ai_edge_litert.interpreter import Interpreter
from sklearn.datasets import load_digits
from torch import nn

from edgec.calibration.samples import select_calibration_indices
from edgec.errors import ExportError
from edgec.targets.onnx_export import export_onnx
from edgec.targets.tflite_export import export_tflite

MIN_AGREEMENT = 0.99


# ---- models -------------------------------------------------------------------------------------


def mlp(features: int = 64) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 10))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(1, 8), block(8, 16))
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
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv2(F.max_pool2d(self.conv1(x), 2)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class OddEdges(nn.Module):
    """Starts and ends with ops the int8 quantizer has no pattern for."""

    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        return torch.tanh(self.body(x.clamp(0, 1) * 0.5)) / 0.7


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("this model cannot be traced")


# ---- data and training --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    return x[:1200], y[:1200], x[1200:], y[1200:]


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
    x, y, _, _ = digits
    return {
        "mlp": (train(mlp, x.reshape(len(x), -1), y, 20), True),
        "cnn": (train(SmallCNN, x, y, 10), False),
    }


def inputs_for(flat: bool, x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1) if flat else x


def calibration_set(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x[select_calibration_indices(y, 128)]


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


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def reference(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# ---- TFLite -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_tflite_int8_is_full_integer_agrees_and_leaves_the_model_alone(tmp_path, trained, digits, name):
    model, flat = trained[name]
    x, y, x_test, _ = (inputs_for(flat, a) if i in (0, 2) else a for i, a in enumerate(digits))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]

    info = export_tflite(model, torch.from_numpy(x[:1]), tmp_path / "m.tflite", precision="int8", calibration=calibration_set(x, y))

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and [type(m) for m in model.modules()] == modules_before
    interpreter = Interpreter(model_path=str(info.path))
    for spec, detail in zip(info.inputs + info.outputs, interpreter.get_input_details() + interpreter.get_output_details()):
        assert detail["dtype"] == np.int8 and spec["dtype"] == "int8"
        assert spec["quantization"] == {"scale": pytest.approx(detail["quantization"][0]), "zero_point": detail["quantization"][1]}
        assert spec["shape"] == detail["shape"].tolist()
    assert info.inputs[0]["layout"] == ("NC" if flat else "NCHW") and info.outputs[0]["layout"] == "NC"
    assert info.conversion["float_ops"] == []
    assert agreement(run_tflite(info.path, x_test), reference(model, x_test)) >= MIN_AGREEMENT


def test_tflite_fp16_has_float16_weights_and_float32_io(tmp_path, trained, digits):
    model, _ = trained["cnn"]
    x, _, x_test, _ = digits
    info = export_tflite(model, torch.from_numpy(x[:1]), tmp_path / "m.tflite", precision="fp16")
    assert [t["dtype"] for t in info.inputs + info.outputs] == ["float32", "float32"]
    tensor_types = {d["dtype"] for d in Interpreter(model_path=str(info.path)).get_tensor_details()}
    assert np.float16 in tensor_types
    out, ref = run_tflite(info.path, x_test), reference(model, x_test)
    assert agreement(out, ref) >= MIN_AGREEMENT and np.abs(out - ref).max() < 0.05


def test_tflite_fp32_matches_torch(tmp_path, trained, digits):
    model, _ = trained["mlp"]
    x, _, x_test, _ = (a.reshape(len(a), -1) if a.ndim == 4 else a for a in digits)
    info = export_tflite(model, torch.from_numpy(x[:1]), tmp_path / "m.tflite", precision="fp32")
    assert info.inputs[0] | {"name": None} == {"name": None, "shape": [1, 64], "dtype": "float32", "layout": "NC", "quantization": None}
    assert np.abs(run_tflite(info.path, x_test) - reference(model, x_test)).max() < 1e-4
    assert set(info.runtime_versions) >= {"torch", "litert-torch", "ai-edge-litert"}


def test_tflite_int8_quantizes_residual_add_and_global_pooling(tmp_path, digits):
    x, y, x_test, _ = digits
    model = train(ResidualGAP, x, y, 30)
    info = export_tflite(model, torch.from_numpy(x[:1]), tmp_path / "m.tflite", precision="int8", calibration=calibration_set(x, y))
    assert info.conversion["float_ops"] == [] and info.conversion["capture"] == "strict, dynamic batch"
    assert agreement(run_tflite(info.path, x_test), reference(model, x_test)) >= MIN_AGREEMENT


def test_tflite_int8_io_stays_int8_when_edge_ops_have_no_int8_pattern(tmp_path, digits):
    x, y, x_test, _ = (a.reshape(len(a), -1) if a.ndim == 4 else a for a in digits)
    model = OddEdges().eval()
    info = export_tflite(model, torch.from_numpy(x[:1]), tmp_path / "m.tflite", precision="int8", calibration=calibration_set(x, y))
    assert [t["dtype"] for t in info.inputs + info.outputs] == ["int8", "int8"]
    assert "TANH" in info.conversion["float_ops"]
    out, ref = run_tflite(info.path, x_test), reference(model, x_test)
    assert np.abs(out - ref).max() < 0.1 * np.ptp(ref)


def test_lenet5_28x28_converts_to_full_integer_tflite_and_int8_onnx(tmp_path):
    torch.manual_seed(0)
    model = LeNet5().eval()
    calibration = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    example = torch.from_numpy(calibration[:1])
    tfl = export_tflite(model, example, tmp_path / "m.tflite", precision="int8", calibration=calibration)
    assert [t["dtype"] for t in tfl.inputs + tfl.outputs] == ["int8", "int8"] and tfl.conversion["float_ops"] == []
    assert tfl.inputs[0]["shape"] == [1, 1, 28, 28] and tfl.inputs[0]["layout"] == "NCHW"
    onx = export_onnx(model, example, tmp_path / "m.onnx", precision="int8", calibration=calibration)
    ref = reference(model, calibration)
    for out in (run_tflite(tfl.path, calibration), run_onnx(onx.path, calibration)):
        assert np.abs(out - ref).max() < 0.1 * np.ptp(ref)


# ---- ONNX ---------------------------------------------------------------------------------------


def test_onnx_fp32_has_a_dynamic_batch_and_matches_torch(tmp_path, trained, digits):
    model, _ = trained["cnn"]
    x, _, x_test, _ = digits
    info = export_onnx(model, torch.from_numpy(x[:1]), tmp_path / "m.onnx", precision="fp32")
    assert info.inputs == [{"name": "input", "shape": [-1, 1, 8, 8], "dtype": "float32", "layout": "NCHW", "quantization": None}]
    assert info.outputs[0]["shape"] == [-1, 10] and info.outputs[0]["layout"] == "NC"
    assert np.abs(run_onnx(info.path, x_test) - reference(model, x_test)).max() < 1e-4
    assert set(info.runtime_versions) == {"torch", "onnx", "onnxruntime"}


def test_onnx_fp16_keeps_float32_io(tmp_path, trained, digits):
    model, _ = trained["cnn"]
    x, _, x_test, _ = digits
    info = export_onnx(model, torch.from_numpy(x[:1]), tmp_path / "m.onnx", precision="fp16")
    assert [t["dtype"] for t in info.inputs + info.outputs] == ["float32", "float32"]
    graph = onnx.load(info.path).graph
    assert {i.data_type for i in graph.initializer if i.dims} == {onnx.TensorProto.FLOAT16}
    out, ref = run_onnx(info.path, x_test), reference(model, x_test)
    assert agreement(out, ref) >= MIN_AGREEMENT and np.abs(out - ref).max() < 0.05


@pytest.mark.parametrize(
    "name, method",
    [("mlp", "minmax"), ("mlp", "percentile"), ("mlp", "entropy"), ("cnn", "minmax")],
)
def test_onnx_int8_is_per_channel_qdq_and_agrees(tmp_path, trained, digits, name, method):
    model, flat = trained[name]
    x, y, x_test, _ = (inputs_for(flat, a) if i in (0, 2) else a for i, a in enumerate(digits))
    info = export_onnx(
        model, torch.from_numpy(x[:1]), tmp_path / "m.onnx", precision="int8",
        calibration=calibration_set(x, y), calibration_method=method,
    )
    graph = onnx.load(info.path).graph
    initializers = {i.name: i for i in graph.initializer}
    weight_scales = [
        initializers[n.input[1]] for n in graph.node
        if n.op_type == "DequantizeLinear" and initializers.get(n.input[0]) is not None
        and initializers[n.input[0]].data_type == onnx.TensorProto.INT8 and len(initializers[n.input[0]].dims) > 1
    ]
    assert weight_scales and all(s.dims[0] > 1 for s in weight_scales)  # one scale per output channel
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert info.conversion["calibration_method"] == method and info.conversion["calibration_samples"] == 128
    assert agreement(run_onnx(info.path, x_test), reference(model, x_test)) >= MIN_AGREEMENT


def test_onnx_mlp_on_28x28_images_with_flatten(tmp_path):
    torch.manual_seed(0)
    model = mlp(784).eval()
    calibration = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    info = export_onnx(model, torch.from_numpy(calibration[:1]), tmp_path / "m.onnx", precision="int8", calibration=calibration)
    assert info.inputs[0]["shape"] == [-1, 1, 28, 28] and info.inputs[0]["layout"] == "NCHW"
    ref = reference(model, calibration)
    assert np.abs(run_onnx(info.path, calibration) - ref).max() < 0.1 * np.ptp(ref)


# ---- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("export", [export_onnx, export_tflite])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_failed_export_raises_export_error_and_leaves_no_file(tmp_path, export, precision):
    path = tmp_path / "out" / "model.bin"
    path.parent.mkdir()
    path.write_bytes(b"an older model")
    example = torch.zeros(1, 4)
    with pytest.raises(ExportError):
        export(Broken(), example, path, precision=precision, calibration=np.zeros((4, 4), np.float32))
    assert list(path.parent.iterdir()) == []


@pytest.mark.parametrize("export", [export_onnx, export_tflite])
def test_int8_needs_well_shaped_calibration(tmp_path, export):
    model, example = mlp(4).eval(), torch.zeros(1, 4)
    with pytest.raises(ExportError, match="calibration"):
        export(model, example, tmp_path / "m", precision="int8")
    with pytest.raises(ExportError, match="shape"):
        export(model, example, tmp_path / "m", precision="int8", calibration=np.zeros((3, 5), np.float32))
    assert list(tmp_path.iterdir()) == []
