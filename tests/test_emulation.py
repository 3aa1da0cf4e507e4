"""A Raspberry Pi bundle verifies bit-exactly on an emulated aarch64 Raspberry Pi OS userland.

The emulated tests skip when qemu-aarch64-static is missing or EDGEC_SKIP_EMULATION=1. The first
run downloads the arm64 userland and the device wheels into edgec's cache (~20 s here); later runs
reuse it (a few seconds per emulated verify).
"""

import importlib.resources
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgec import emulation
from edgec.errors import ConfigError, InputError

# STAND-IN for the bundle runner (edgec/ondevice + run.py), used until the exporter lands: it knows
# only `run.py verify --exact --json FILE` and checks model.tflite's outputs on test_vectors.npz.
STANDIN_RUN_PY = '''
import json, sys
import numpy as np
try:
    from tflite_runtime.interpreter import Interpreter
except ImportError:
    from ai_edge_litert.interpreter import Interpreter

if sys.argv[1:4] != ["verify", "--exact", "--json"] or len(sys.argv) != 5:
    sys.exit(2)
vectors = np.load("test_vectors.npz")
interpreter = Interpreter(model_path="model.tflite")
interpreter.allocate_tensors()
(model_input,), (model_output,) = interpreter.get_input_details(), interpreter.get_output_details()
outputs = []
for x in vectors["inputs"]:
    interpreter.set_tensor(model_input["index"], x[None])
    interpreter.invoke()
    outputs.append(interpreter.get_tensor(model_output["index"])[0])
exact = bool(np.array_equal(np.stack(outputs), vectors["expected"]))
with open(sys.argv[4], "w") as report:
    json.dump({"passed": exact, "vectors": len(outputs)}, report)
sys.exit(0 if exact else 1)
'''


def build_rpi_bundle(out_dir: Path) -> Path:
    """A Raspberry Pi TFLite bundle in ``out_dir``.

    STAND-IN until the exporter lands (replace the body with `edgec build` for the rpi target): a
    tiny full-int8 CNN from litert-torch, its outputs on x86 ai-edge-litert as the expected test
    vectors, the stand-in run.py above and the device requirements.
    """
    import litert_torch
    import torch
    from ai_edge_litert.interpreter import Interpreter
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    ).eval()
    example = torch.randn(1, 1, 8, 8)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
    for _ in range(16):
        prepared(torch.randn(1, 1, 8, 8))
    quantized = convert_pt2e(prepared, fold_quantize=False)
    litert_torch.convert(quantized, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(
        str(out_dir / "model.tflite"))

    interpreter = Interpreter(model_path=str(out_dir / "model.tflite"))
    interpreter.allocate_tensors()
    (model_input,), (model_output,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert model_input["dtype"] == np.int8, "the stand-in model should be full int8"
    inputs = np.random.default_rng(0).integers(-128, 128, (16, *model_input["shape"][1:]), dtype=np.int8)
    expected = []
    for x in inputs:
        interpreter.set_tensor(model_input["index"], x[None])
        interpreter.invoke()
        expected.append(interpreter.get_tensor(model_output["index"])[0])
    np.savez(out_dir / "test_vectors.npz", inputs=inputs, expected=np.stack(expected))
    (out_dir / "run.py").write_text(STANDIN_RUN_PY)
    requirements = importlib.resources.files("edgec.targets") / "rpi-device-requirements.txt"
    (out_dir / "requirements.txt").write_text(requirements.read_text())
    return out_dir


@pytest.fixture(scope="module")
def arm64_cache() -> Path:
    if os.environ.get("EDGEC_SKIP_EMULATION") == "1":
        pytest.skip("EDGEC_SKIP_EMULATION=1")
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("qemu-aarch64-static not found (apt-get install qemu-user-static)")
    return emulation.DEFAULT_CACHE_DIR


@pytest.fixture(scope="module")
def rpi_bundle(tmp_path_factory, arm64_cache) -> Path:
    return build_rpi_bundle(tmp_path_factory.mktemp("rpi"))


@pytest.mark.parametrize("runtime", list(emulation.RUNTIMES))
def test_bundle_verifies_exactly_on_emulated_aarch64(rpi_bundle, arm64_cache, runtime):
    files_before = sorted(rpi_bundle.rglob("*"))
    result = emulation.verify_bundle_emulated(rpi_bundle, arm64_cache, runtime)
    info = result["emulation"]
    assert info["exit_code"] == 0, result
    assert info["machine"] == "aarch64"
    assert info["runtime"] == runtime and info["runtime_version"]
    assert set(info["not_checked"]) == set(emulation.RUNTIMES) - {runtime}
    assert sorted(rpi_bundle.rglob("*")) == files_before, "verify must leave the bundle untouched"


def test_missing_qemu_is_a_one_line_input_error(monkeypatch, tmp_path):
    monkeypatch.setattr(emulation.shutil, "which", lambda name: None)
    with pytest.raises(InputError, match=r"apt-get install qemu-user-static") as error:
        emulation.prepare_arm64_python(tmp_path)
    assert "\n" not in str(error.value)


def test_unknown_runtime_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="tflite-runtime"):
        emulation.prepare_arm64_python(tmp_path, runtime="onnxruntime")
