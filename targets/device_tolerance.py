"""Each Raspberry Pi TFLite runtime's test-vector tolerance, in int8 output steps, by op family.

A bundle's expected outputs are computed at build time with ai-edge-litert (XNNPACK). On the Pi, a
runtime with the same kernels reproduces them bit for bit; another runtime's int8 kernels round
differently, and the rounding differences of some op families grow through the network. Measured
with ``edgec verify --emulate arm64`` (Cortex-A72 under qemu-user, Debian bookworm Python 3.11; small
user models trained on digits, 16 test vectors; max |diff| in output int8 steps; docs/raspberry-pi.md):

=========================================================  ====================  ====================
model                                                      ai-edge-litert 2.3.0  tflite-runtime 2.14.0
=========================================================  ====================  ====================
ResNet basic blocks (conv, add, ReLU)                      0                     1
MobileNetV2 inverted residuals (depthwise, ReLU6, add)     0                     1
MobileNetV3 blocks (hardswish, squeeze-excite, Dropout)    0                     4
=========================================================  ====================  ====================

tflite-runtime 2.14's int8 HARD_SWISH kernel is its own fixed-point approximation (XNNPACK 2.14 does
not take it), so every hardswish layer may move its output by a step and the next layers carry that on.
The allowance is the worst measured difference of the family plus half of it again (the measured
models are small, and a deeper one carries the differences through more layers); a real conversion
fault (a corrupted weight, Dropout left in training mode) moves outputs by far more steps than that,
so verify still fails it with every runtime (tests/test_device_tolerance.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The runtime that computed the expected outputs reproduces them exactly; one step covers another
# machine's (x86 vs Arm) XNNPACK kernels, as before per-runtime tolerances.
BASE_STEPS = {"ai-edge-litert": 1, "tflite-runtime": 1}
# Op families (TFLite builtin operator names) whose int8 kernels differ between runtimes, and the
# steps each runtime may then differ by (see the module docstring for the measurements).
FAMILY_STEPS = {"HARD_SWISH": {"tflite-runtime": 6}}
# atol = steps x output scale x this: a difference of exactly k steps passes despite float rounding.
SCALE_MARGIN = 1.01


def runtime_tolerances(model_path: Path, output: dict[str, Any]) -> dict[str, dict[str, float | int]]:
    """``{runtime: {"int8_steps", "atol"}}`` for a TFLite model whose output is int8-quantized;
    ``{}`` for a float output (its float tolerance covers every runtime)."""
    quantization = output.get("quantization")
    if not quantization:
        return {}
    ops = set(tflite_op_names(model_path))
    tolerances = {}
    for runtime, base in BASE_STEPS.items():
        steps = max([base] + [by_runtime.get(runtime, base) for op, by_runtime in FAMILY_STEPS.items() if op in ops])
        tolerances[runtime] = {"int8_steps": steps, "atol": steps * float(quantization["scale"]) * SCALE_MARGIN}
    return tolerances


def tflite_op_names(model_path: Path) -> list[str]:
    """The builtin operator names of a TFLite model's operators, in graph order."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = flatbuffer_utils.read_model(str(model_path))
    return [names[flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])]
            for graph in model.subgraphs for op in graph.operators]
