"""The model zoo: every model adapts to the input shape and class count, scales with ``width``,
and keeps the layer names users put in per-layer settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgec.base.errors import ConfigError
from edgec.zoo import ZOO, DSCNN, MobileNetV1, ResNet8, default_width

IMAGE_MODELS = ["lenet-5", "cnn-small", "resnet-8", "ds-cnn", "mobilenet-v1"]
EDGE_MODELS = ["resnet-8", "ds-cnn", "mobilenet-v1"]


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def out_channels(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", EDGE_MODELS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 49, 10), (3, 5, 7), (1, 1, 1)])
def test_edge_models_adapt_to_the_input_shape_and_class_count(name, shape):
    torch.manual_seed(0)
    model = ZOO[name](input_shape=shape, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", EDGE_MODELS)
def test_width_scales_every_conv_and_keeps_the_layer_names(name):
    full = ZOO[name](input_shape=(3, 32, 32), num_classes=10, width=1.0)
    half = ZOO[name](input_shape=(3, 32, 32), num_classes=10, width=0.5)
    assert [n for n, _ in full.named_modules()] == [n for n, _ in half.named_modules()]
    assert all(h == max(1, round(f / 2)) for f, h in zip(out_channels(full), out_channels(half)))
    assert params(half) < params(full) / 2.5
    tiny = ZOO[name](input_shape=(1, 8, 8), num_classes=2, width=0.01)  # every layer keeps a channel
    assert min(out_channels(tiny)) >= 1
    assert tiny(torch.zeros(1, 1, 8, 8)).shape == (1, 2)


def test_resnet8_is_mlperf_tinys_image_classification_model():
    model = ResNet8(input_shape=(3, 32, 32), num_classes=10)
    names = {n for n, _ in model.named_modules()}
    assert {"conv1", "bn1", "stack1.conv1", "stack2.shortcut.0", "stack3.conv2", "fc"} <= names
    assert "stack1.shortcut.0" not in names  # identity shortcut in the unstrided first stack
    assert [model.conv1.out_channels, model.stack1.conv2.out_channels, model.stack2.conv2.out_channels,
            model.stack3.conv2.out_channels] == [16, 16, 32, 64]
    assert (model.stack2.conv1.stride, model.stack3.conv1.stride) == ((2, 2), (2, 2))
    assert 77_000 < params(model) < 80_000  # MLPerf Tiny's ResNet-8: 78k parameters


def test_ds_cnn_is_mlperf_tinys_keyword_spotting_model():
    model = DSCNN(input_shape=(1, 49, 10), num_classes=12)
    assert model.conv1.kernel_size == (10, 4) and model.conv1.stride == (2, 2)
    assert model.pad.padding == (1, 1, 4, 5)  # TensorFlow "same": out 25x5, the odd row of padding below
    assert {f"ds{i}.dw" for i in range(1, 5)} <= {n for n, _ in model.named_modules()}
    assert isinstance(model.dropout1, nn.Dropout) and isinstance(model.dropout2, nn.Dropout)
    with torch.no_grad():
        features = model.bn1(model.conv1(model.pad(torch.zeros(1, 1, 49, 10))))
    assert features.shape == (1, 64, 25, 5)
    assert 22_000 < params(model) < 25_000  # MLPerf Tiny's DS-CNN (small): 24k parameters, BN included
    small = DSCNN(input_shape=(1, 4, 3), num_classes=2)  # the kernel is clipped to the input
    assert small.conv1.kernel_size == (4, 3)


def test_mobilenet_v1_defaults_to_the_visual_wake_words_width():
    assert default_width("mobilenet-v1") == 0.25
    assert all(default_width(name) == 1.0 for name in ZOO if name != "mobilenet-v1")
    model = MobileNetV1(input_shape=(3, 96, 96), num_classes=2)
    assert model.conv1.out_channels == 8 and model.ds13.pw.out_channels == 256
    assert 200_000 < params(model) < 230_000  # MLPerf Tiny's VWW MobileNetV1 0.25: 0.2M parameters
    with torch.no_grad():
        x = torch.zeros(1, 3, 96, 96)
        x = torch.relu(model.bn1(model.conv1(x)))
        for i in range(1, 14):
            x = getattr(model, f"ds{i}")(x)
    assert x.shape[-2:] == (3, 3)  # stride 32
    assert MobileNetV1(input_shape=(3, 96, 96), num_classes=2, width=1.0).ds13.pw.out_channels == 1024


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_models_refuse_flat_input(name):
    with pytest.raises(ConfigError, match="image"):
        ZOO[name](input_shape=(64,), num_classes=10)


@pytest.mark.parametrize("name", EDGE_MODELS)
def test_edge_models_train(name):
    """One short fit on a separable toy task: gradients reach every layer."""
    torch.manual_seed(0)
    model = ZOO[name](input_shape=(1, 8, 8), num_classes=2, width=0.5)
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long()
    x = x + (y.float() * 2 - 1)[:, None, None, None]
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in model.parameters())
    assert loss.item() < 0.3
