"""Each Raspberry Pi TFLite runtime's test-vector tolerance, in int8 output steps, by op family.

A bundle's expected outputs are computed at build time with ai-edge-litert (XNNPACK). On the Pi, a
runtime with the same kernels reproduces them bit for bit; another runtime's int8 kernels round
differently, and the rounding differences of some op families grow through the network. Measured
with ``edgec verify --emulate arm64`` (Cortex-A72 under qemu-user, Debian bookworm Python 3.11; small
user models trained on digits, 16 test vectors; max |diff| in output int8 steps; docs/raspberry-pi.md):

model (its TFLite op families)                      ai-edge-litert 2.3.0  tflite-runtime 2.14.0 (allowance)
ResNet basic blocks (CONV_2D, ADD, ReLU)            0                     1 (2)
MobileNetV2 inverted residuals (DEPTHWISE_CONV_2D)  0                     1 (2)
hardswish without squeeze-excite (HARD_SWISH)       0                     2 (5)
squeeze-excite with ReLU (MUL: gate and scale)      0                     2 (4)
MobileNetV3 blocks (HARD_SWISH and MUL)             0                     4 (7)

tflite-runtime 2.14's int8 HARD_SWISH and MUL kernels round differently from ai-edge-litert's, so
each such layer may move its output by a step and the layers after it carry that on: the differences of the families add up (MobileNetV3's 4 = hardswish's 2 + squeeze-excite's 2).
A runtime's allowance is therefore its base plus the extra steps of every family the model has, each
set to at least 1.5x the worst difference measured (the measured models are small; a deeper one
carries differences through more layers). A real conversion fault (a corrupted weight) moves outputs
by far more steps than that, so verify still fails it with every runtime (tests/test_device_tolerance.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Steps every model may differ by. ai-edge-litert computed the expected outputs and reproduces them
# exactly; its one step covers another machine's (x86 vs Arm) XNNPACK kernels, as before.
BASE_STEPS = {"ai-edge-litert": 1, "tflite-runtime": 2}
# Op families (TFLite builtin operator names) whose int8 kernels differ between runtimes, and the
# extra steps each adds for a runtime (see the module docstring for the measurements).
FAMILY_EXTRA_STEPS = {"HARD_SWISH": {"tflite-runtime": 3}, "MUL": {"tflite-runtime": 2}}
# atol = steps x output scale x this: a difference of exactly k steps passes despite float rounding.
SCALE_MARGIN = 1.01


def runtime_tolerances(model_path: Path, output: dict[str, Any]) -> dict[str, dict[str, float | int]]:
    """``{runtime: {"int8_steps", "atol"}}`` for a TFLite model whose output is int8-quantized;
    ``{}`` for a float output (its float tolerance covers every runtime)."""
    quantization = output.get("quantization")
    if not quantization:
        return {}
    return tolerances_for_ops(set(tflite_op_names(model_path)), float(quantization["scale"]))


def tolerances_for_ops(ops: set[str], output_scale: float) -> dict[str, dict[str, float | int]]:
    """Each runtime's steps: its base plus the extra steps of every op family in ``ops``."""
    tolerances = {}
    for runtime, base in BASE_STEPS.items():
        steps = base + sum(extra.get(runtime, 0) for op, extra in FAMILY_EXTRA_STEPS.items() if op in ops)
        tolerances[runtime] = {"int8_steps": steps, "atol": steps * output_scale * SCALE_MARGIN}
    return tolerances


def tflite_op_names(model_path: Path) -> list[str]:
    """The builtin operator names of a TFLite model's operators, in graph order."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = flatbuffer_utils.read_model(str(model_path))
    return [names[flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])]
            for graph in model.subgraphs for op in graph.operators]
