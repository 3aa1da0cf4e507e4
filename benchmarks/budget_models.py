"""User model factories for benchmarks/accuracy_budget.py, named as ``benchmarks.budget_models:NAME``.

They reach edgec the way a user's own model does (``--model package.module:factory``: no zoo entry, no
width argument, so distillation derives its student by structured pruning). ``resnet8`` and ``ds_cnn``
build the architectures of MLPerf Tiny's image-classification ResNet and keyword-spotting DS-CNN (the
same layers as edgec's zoo entries, whose classes they reuse); ``mobilenet_v2`` and ``mobilenet_v3`` are
the inverted-residual (ReLU6) and MobileNetV3 (hardswish, squeeze-excite, Dropout before the classifier)
networks of ``tests/fixtures/edge_models.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resnet8(*, input_shape, num_classes):
    from edgec.zoo import ResNet8

    return ResNet8(input_shape, num_classes)


def ds_cnn(*, input_shape, num_classes):
    from edgec.zoo import DSCNN

    return DSCNN(input_shape, num_classes)


def mobilenet_v2(*, input_shape, num_classes):
    return _fixtures().inverted_residual(input_shape=input_shape, num_classes=num_classes)


def mobilenet_v3(*, input_shape, num_classes):
    return _fixtures().mobilenet_v3_block(input_shape=input_shape, num_classes=num_classes)


def _fixtures():
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import edge_models

    return edge_models
