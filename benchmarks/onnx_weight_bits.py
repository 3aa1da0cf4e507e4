"""ONNX int8 with 8-bit and with 7-bit weights on this CPU: why the ONNX route quantizes weights in 7 bits.

    python benchmarks/onnx_weight_bits.py [--json benchmarks/results/onnx_weight_bits.json]

onnxruntime's x86 int8 kernels on CPUs without VNNI (AVX2 only) multiply u8 activations by s8
weights with ``VPMADDUBSW``, which adds two products into a saturating 16-bit lane: 255 x 127 x 2
overflows, 255 x 64 x 2 does not (onnxruntime's quantization docs: ``reduce_range``). On a CPU with
VNNI (``avx512_vnni`` / ``avx_vnni``) or AMX both settings are exact and the 8-bit file is the
more precise. Per model, the same fp32 ONNX file is quantized twice by ``quantize_static`` with the
export's settings (QDQ, s8s8, per-channel weights, min-max calibration on the same samples), 8-bit
and 7-bit (``reduce_range``) weights, and run by onnxruntime's CPU provider beside torch:

- ``lenet5_random``: the test suite's LeNet-5 (conv-pool-conv-pool-fc-fc, untrained, seed 0) on 16
  uniform-random 28x28 inputs: ``max_err_of_range`` = max |int8 - torch| / output range;
- ``cnn_small_digits``: edgec's cnn-small trained 10 epochs on scikit-learn's digits (no
  ``../shared`` needed): the same figure on the test split, and top-1 agreement with torch.

Keys: ``models.<name>.bits_8`` / ``bits_7``: ``max_err_of_range``, ``agreement`` (digits only);
``machine`` (the CPU and its flags: the figures depend on them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def lenet5_random():
    """The test suite's LeNet-5 (tests/test_converters.py) with relu before pooling, untrained."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_converters import LeNet5

    torch.manual_seed(0)
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    return LeNet5(False).eval(), x, x


def cnn_small_digits():
    from edgec.base.data import load_dataset
    from edgec.zoo import ZOO

    data = load_dataset("digits")
    x, y = data.to_input(data.x_train), data.y_train
    torch.manual_seed(0)
    model = ZOO["cnn-small"](x.shape[1:], 10)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    for _ in range(10):
        model.train()
        for idx in torch.randperm(len(xt)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval(), x[:128], data.to_input(data.x_test)


def quantized_errors(model: nn.Module, calibration: np.ndarray, x: np.ndarray, work: Path) -> dict:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    from edgec.calibration.readers import OnnxCalibrationReader
    from edgec.targets.onnx_export import INPUT_NAME, _export_fp32

    fp32, prepared = work / "fp32.onnx", work / "prepared.onnx"
    _export_fp32(model, torch.from_numpy(calibration[:1]), fp32)
    quant_pre_process(fp32, prepared)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    out = {}
    for bits in (8, 7):
        path = work / f"int8-w{bits}.onnx"
        quantize_static(prepared, path, OnnxCalibrationReader(calibration, INPUT_NAME), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        reduce_range=bits == 7, calibrate_method=CalibrationMethod.MinMax)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {INPUT_NAME: x})[0]
        out[f"bits_{bits}"] = {"max_err_of_range": float(np.abs(got - reference).max() / np.ptp(reference)),
                               "agreement": float((got.argmax(1) == reference.argmax(1)).mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "onnx_weight_bits.json")
    args = parser.parse_args()
    from edgec.ondevice.machine import machine_info

    torch.set_num_threads(1)
    result = {"schema": "edgec-benchmark-onnx-weight-bits", "schema_version": 1, "models": {},
              "machine": machine_info(), "command": "python benchmarks/onnx_weight_bits.py"}
    for name, make in (("lenet5_random", lenet5_random), ("cnn_small_digits", cnn_small_digits)):
        model, calibration, x = make()
        with tempfile.TemporaryDirectory(prefix="edgec-bits-") as tmp:
            result["models"][name] = quantized_errors(model, calibration, x, Path(tmp))
    print(f"CPU: {result['machine']['cpu']} ({', '.join(result['machine']['cpu_features']) or 'no listed features'})")
    print("| model | weights | max err / output range | top-1 agreement with torch |")
    print("|---|---|---|---|")
    for name, row in result["models"].items():
        for bits in (8, 7):
            r = row[f"bits_{bits}"]
            print(f"| {name} | {bits} bits | {r['max_err_of_range']:.4f} | {r['agreement']:.4f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
