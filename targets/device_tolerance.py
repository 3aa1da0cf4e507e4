"""Each Raspberry Pi TFLite runtime's test-vector tolerance, in int8 output steps, by op family.

A bundle's expected outputs are computed at build time with ai-edge-litert (XNNPACK). On the Pi, a
runtime with the same kernels reproduces them bit for bit; another runtime's int8 kernels round
differently, and the rounding differences of some op families grow through the network. Measured
with ``edgec verify --emulate arm64`` (Cortex-A72 under qemu-user, Debian bookworm Python 3.11; small
user models trained on digits, 16 test vectors; max |diff| in output int8 steps; docs/raspberry-pi.md):

model (its TFLite op families; weighted layers)        ai-edge-litert 2.3.0  tflite-runtime 2.14.0 (allowance)
ResNet basic blocks (CONV_2D, ADD, ReLU; 7)            0                     1 (3)
MobileNetV2, 3 inverted residuals (DEPTHWISE; 12)      0                     1-2 (5)
hardswish without squeeze-excite (HARD_SWISH)          0                     2 (>= 5)
squeeze-excite with ReLU (MUL: gate and scale)         0                     2 (>= 4)
MobileNetV3 blocks (HARD_SWISH and MUL; 14)            0                     4 (11)
MobileNetV2, 8 inverted residuals (27)                 0                     7 (11)
MobileNetV2, 16 inverted residuals (51)                0                     10 (21)
MobileNetV3, 8 blocks (HARD_SWISH and MUL; 44)         0                     4 (23)
MobileNetV2-0.35 at 96x96, channel-pruned (53)         0                     4 (22)

tflite-runtime 2.14's int8 HARD_SWISH and MUL kernels round differently from ai-edge-litert's, so
each such layer may move its output by a step and the layers after it carry that on: the differences of the families add up (MobileNetV3's 4 = hardswish's 2 + squeeze-excite's 2).
The same carrying-on makes the differences grow with depth even in plain convolutions: ReLU6
inverted residuals, 1 step at 3 blocks, 7 at 8 and 10 at 16 (the counts in parentheses are weighted
layers: CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED; top-1 agreement on the vectors stayed 1.0 and the
accuracy on the bundle's eval set within its 0.01 tolerance in every case). A runtime's allowance is
therefore the larger of its base and its steps per weighted layer times the model's weighted layers,
plus the extra steps of every family the model has, each set to at least 1.5x the worst difference
measured (0.4 a layer: 7 steps at 27 layers is 0.26). A real conversion fault (a corrupted weight)
moves outputs by more steps than that, so verify still fails it with every runtime
(tests/test_device_tolerance.py); on a deep model the alternative runtime's check is the looser one:
keep ai-edge-litert on the Pi, whose check is one step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Steps every model may differ by. ai-edge-litert computed the expected outputs and reproduces them
# exactly; its one step covers another machine's (x86 vs Arm) XNNPACK kernels, as before.
BASE_STEPS = {"ai-edge-litert": 1, "tflite-runtime": 2}
# Op families (TFLite builtin operator names) whose int8 kernels differ between runtimes, and the
# extra steps each adds for a runtime (see the module docstring for the measurements).
FAMILY_EXTRA_STEPS = {"HARD_SWISH": {"tflite-runtime": 3}, "MUL": {"tflite-runtime": 2}}
# Steps per weighted layer: a runtime whose kernels round differently carries each layer's difference on.
WEIGHTED_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"})
DEPTH_STEPS_PER_LAYER = {"tflite-runtime": 0.4}
# atol = steps x output scale x this: a difference of exactly k steps passes despite float rounding.
SCALE_MARGIN = 1.01


def runtime_tolerances(model_path: Path, output: dict[str, Any]) -> dict[str, dict[str, float | int]]:
    """``{runtime: {"int8_steps", "atol"}}`` for a TFLite model whose output is int8-quantized;
    ``{}`` for a float output (its float tolerance covers every runtime)."""
    quantization = output.get("quantization")
    if not quantization:
        return {}
    return tolerances_for_ops(tflite_op_names(model_path), float(quantization["scale"]))


def tolerances_for_ops(ops: list[str], output_scale: float) -> dict[str, dict[str, float | int]]:
    """Each runtime's steps for a model whose operators are ``ops`` (one name per operator): the larger
    of its base and its per-layer steps times the weighted layers, plus every op family's extra steps."""
    layers = sum(op in WEIGHTED_OPS for op in ops)
    tolerances = {}
    for runtime, base in BASE_STEPS.items():
        steps = max(base, math.ceil(DEPTH_STEPS_PER_LAYER.get(runtime, 0.0) * layers))
        steps += sum(extra.get(runtime, 0) for op, extra in FAMILY_EXTRA_STEPS.items() if op in ops)
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
