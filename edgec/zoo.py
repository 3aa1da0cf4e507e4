"""Built-in models. Each adapts to the data's input shape and class count.

Layer attribute names (``fc1``, ``conv2``...) are the names users give to per-layer pruning and
weight-sharing settings, so they are stable and follow the papers where one exists.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import nn

from .base.errors import ConfigError


def _features(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


class LeNet300100(nn.Module):
    """Deep Compression's LeNet-300-100 (784-300-100-10 on MNIST)."""

    def __init__(self, input_shape, num_classes, width: float = 1.0):
        super().__init__()
        h1, h2 = max(1, round(300 * width)), max(1, round(100 * width))
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(_features(input_shape), h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x):
        x = torch.relu(self.fc1(self.flatten(x)))
        return self.fc3(torch.relu(self.fc2(x)))


class LeNet5(nn.Module):
    """The Caffe LeNet-5 used by Deep Compression: conv20-pool-conv50-pool-fc500-fc.

    Caffe's convolutions are unpadded (28 -> 24 -> 12 -> 8 -> 4); inputs smaller than 16 pixels
    use padding 2 so the two 5x5 convolutions still fit. A ReLU follows each pooling layer
    (Caffe's original has one only after ip1); it trains faster and costs nothing at export.
    """

    def __init__(self, input_shape, num_classes, width: float = 1.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"lenet-5 needs image input (C, H, W); the data has shape {list(input_shape)}")
        c, h, w = input_shape
        pad = 0 if min(h, w) >= 16 else 2
        c1, c2, f1 = (max(1, round(n * width)) for n in (20, 50, 500))
        self.conv1 = nn.Conv2d(c, c1, 5, padding=pad)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=pad)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        with torch.no_grad():
            n = self._conv(torch.zeros(1, c, h, w)).numel()
        self.fc1 = nn.Linear(n, f1)
        self.fc2 = nn.Linear(f1, num_classes)

    def _conv(self, x):
        x = torch.relu(self.pool(self.conv1(x)))
        return torch.relu(self.pool(self.conv2(x)))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.flatten(self._conv(x)))))


class MLP(nn.Module):
    """Fully connected network with configurable hidden widths."""

    def __init__(self, input_shape, num_classes, widths=(256, 128), width: float = 1.0):
        super().__init__()
        dims = [_features(input_shape)] + [max(1, round(w * width)) for w in widths]
        self.flatten = nn.Flatten()
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.out = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.flatten(x)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


class CNNSmall(nn.Module):
    """Conv3x3-BN-ReLU-MaxPool blocks, then one linear classifier."""

    def __init__(self, input_shape, num_classes, channels=(16, 32), width: float = 1.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"cnn-small needs image input (C, H, W); the data has shape {list(input_shape)}")
        c, h, w = input_shape
        blocks = []
        for out in (max(1, round(ch * width)) for ch in channels):
            pool = nn.MaxPool2d(2) if min(h, w) >= 2 else nn.Identity()
            blocks.append(nn.Sequential(nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), pool))
            c = out
            h, w = (h // 2, w // 2) if isinstance(pool, nn.MaxPool2d) else (h, w)
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c * h * w, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.features(x)))


def _channels(n: int, width: float) -> int:
    return max(1, round(n * width))


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) of one dimension: the extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut (a strided 1x1 conv-BN when
    the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet8(nn.Module):
    """MLPerf Tiny's image-classification ResNet-8 (CIFAR-10, 32x32x3): a conv3x3-BN-ReLU stem of 16
    channels and three basic blocks of 16, 32 and 64 channels (the last two strided), global average
    pooling and one linear classifier.

    Layer names: ``conv1``/``bn1`` (stem), ``stack1``..``stack3`` (each ``conv1``, ``bn1``, ``conv2``,
    ``bn2``, ``shortcut``), ``fc``. A block is strided only while the feature map is at least 4 pixels,
    so small inputs keep a spatial extent.
    """

    def __init__(self, input_shape, num_classes, channels=(16, 32, 64), width: float = 1.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"resnet-8 needs image input (C, H, W); the data has shape {list(input_shape)}")
        c, h, w = input_shape
        widths = [_channels(n, width) for n in channels]
        self.conv1 = nn.Conv2d(c, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c, size = widths[0], min(h, w)
        for i, out in enumerate(widths, start=1):
            stride = 2 if i > 1 and size >= 4 else 1
            setattr(self, f"stack{i}", _BasicBlock(c, out, stride))
            c, size = out, (size + stride - 1) // stride
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.stack3(self.stack2(self.stack1(x)))
        return self.fc(self.flatten(self.pool(x)))


class _DepthwiseSeparable(nn.Module):
    """Depthwise conv3x3-BN-ReLU then pointwise conv1x1-BN-ReLU (MobileNetV1, DS-CNN)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.dw_bn = nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        x = torch.relu(self.dw_bn(self.dw(x)))
        return torch.relu(self.pw_bn(self.pw(x)))


class DSCNN(nn.Module):
    """MLPerf Tiny's keyword-spotting DS-CNN (small: 64 channels, 49x10 MFCC input).

    A 10x4 stride-2 conv with TensorFlow "same" padding (explicit ``pad`` then an unpadded conv, as in
    the Keras reference), BN, ReLU, Dropout(0.2); four depthwise-separable blocks (``ds1``..``ds4``);
    Dropout(0.4), global average pooling, ``fc``. Works on any (C, H, W) input: the first kernel is
    clipped to the input size.
    """

    def __init__(self, input_shape, num_classes, channels: int = 64, blocks: int = 4, width: float = 1.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"ds-cnn needs image-shaped input (C, H, W); the data has shape {list(input_shape)}")
        c, h, w = input_shape
        kernel = (min(10, h), min(4, w))
        stride = (2 if h >= 4 else 1, 2 if w >= 4 else 1)
        (top, bottom), (left, right) = (_same_padding(n, k, s) for n, k, s in zip((h, w), kernel, stride))
        ch = _channels(channels, width)
        self.pad = nn.ZeroPad2d((left, right, top, bottom))
        self.conv1 = nn.Conv2d(c, ch, kernel, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.dropout1 = nn.Dropout(0.2)
        for i in range(1, blocks + 1):
            setattr(self, f"ds{i}", _DepthwiseSeparable(ch, ch))
        self.blocks = blocks
        self.dropout2 = nn.Dropout(0.4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x):
        x = self.dropout1(torch.relu(self.bn1(self.conv1(self.pad(x)))))
        for i in range(1, self.blocks + 1):
            x = getattr(self, f"ds{i}")(x)
        return self.fc(self.dropout2(self.flatten(self.pool(x))))


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017) at width 0.25 by default: MLPerf Tiny's visual-wake-words model
    (96x96x3, 2 classes). A conv3x3 stride-2 stem of 32 channels (``conv1``), thirteen
    depthwise-separable blocks (``ds1``..``ds13``, 64 to 1024 channels, five of them strided), global
    average pooling, ``fc``. A stride is kept only while the feature map is at least 4 pixels, so a
    small input keeps a spatial extent.
    """

    CONFIG = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, input_shape, num_classes, width: float = 0.25):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"mobilenet-v1 needs image input (C, H, W); the data has shape {list(input_shape)}")
        c, h, w = input_shape
        size = min(h, w)
        stride = 2 if size >= 4 else 1
        out = _channels(32, width)
        self.conv1 = nn.Conv2d(c, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        c, size = out, (size + stride - 1) // stride
        for i, (channels, s) in enumerate(self.CONFIG, start=1):
            stride = s if size >= 4 else 1
            out = _channels(channels, width)
            setattr(self, f"ds{i}", _DepthwiseSeparable(c, out, stride))
            c, size = out, (size + stride - 1) // stride
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        for i in range(1, len(self.CONFIG) + 1):
            x = getattr(self, f"ds{i}")(x)
        return self.fc(self.flatten(self.pool(x)))


ZOO: dict[str, Callable[..., nn.Module]] = {
    "lenet-300-100": LeNet300100,
    "lenet-5": LeNet5,
    "mlp": MLP,
    "cnn-small": CNNSmall,
    "resnet-8": ResNet8,
    "ds-cnn": DSCNN,
    "mobilenet-v1": MobileNetV1,
}


def default_width(name: str) -> float:
    """The width a zoo model is built at when its arguments name none (1.0, mobilenet-v1: 0.25).

    Scaling a zoo teacher by a student width multiplies this, not 1.0, when the teacher's
    arguments leave ``width`` out.
    """
    return inspect.signature(ZOO[name]).parameters["width"].default


class DenseAutoencoder(nn.Module):
    """MLPerf Tiny's anomaly-detection autoencoder (ToyADMOS, 640 inputs): dense 128-128-128-128, a
    bottleneck of 8, dense 128-128-128-128, then a linear layer back to the input size, on the
    flattened input; the anomaly score is the reconstruction error (task = "reconstruction").

    ``widths`` are the encoder's hidden widths (the decoder mirrors them), scaled by ``width`` (a
    distillation student keeps the ``bottleneck``). ReLU after every layer but the last; the
    reference's BatchNorm layers are left out (they do not fold into int8 dense kernels). The
    output is flat ``(N, features)`` whatever the input's shape. Layer names: ``encoder.i``,
    ``bottleneck``, ``decoder.i``, ``out``. ``num_classes`` is accepted and ignored.
    """

    def __init__(self, input_shape, num_classes=None, widths=(128, 128, 128, 128), bottleneck: int = 8,
                 width: float = 1.0):
        super().__init__()
        features = _features(input_shape)
        hidden = [_channels(w, width) for w in widths]
        if bottleneck < 1:
            raise ConfigError(f"autoencoder: bottleneck must be at least 1, got {bottleneck}")
        enc = [features] + hidden
        dec = [bottleneck] + hidden[::-1]
        self.flatten = nn.Flatten()
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(enc, enc[1:]))
        self.bottleneck = nn.Linear(enc[-1], bottleneck)
        self.decoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dec, dec[1:]))
        self.out = nn.Linear(dec[-1], features)

    def forward(self, x):
        x = self.flatten(x)
        for layer in self.encoder:
            x = torch.relu(layer(x))
        x = torch.relu(self.bottleneck(x))
        for layer in self.decoder:
            x = torch.relu(layer(x))
        return self.out(x)


class ConvAutoencoder(nn.Module):
    """A small convolutional autoencoder for images (task = "reconstruction"): stride-2 conv3x3-ReLU
    blocks (``channels``, scaled by ``width``) down to the code, then per block a nearest-neighbour
    upsampling back to the size the encoder saw and a conv3x3 (ReLU but the last); the output has
    the input's shape (N, C, H, W). ``output = "sigmoid"`` bounds it to [0, 1] (inputs scaled to
    [0, 1], such as 8-bit images: int8 then keeps the whole range exactly); ``"linear"`` (default)
    does not. Only ops with int8 TFLite kernels (CONV_2D, RESIZE_NEAREST_NEIGHBOR). Layer names:
    ``encoder.i``, ``decoder.i``. ``num_classes`` is accepted and ignored.
    """

    def __init__(self, input_shape, num_classes=None, channels=(16, 32), output: str = "linear", width: float = 1.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"conv-autoencoder needs image input (C, H, W); the data has shape {list(input_shape)}")
        if output not in ("linear", "sigmoid"):
            raise ConfigError(f"conv-autoencoder: output must be \"linear\" or \"sigmoid\", got {output!r}")
        c, h, w = input_shape
        widths = [_channels(n, width) for n in channels]
        self.sizes = []  # the (H, W) each encoder block receives: the decoder restores them in reverse
        encoder, c_in = [], c
        for out in widths:
            self.sizes.append((h, w))
            stride = 2 if min(h, w) >= 2 else 1
            encoder.append(nn.Conv2d(c_in, out, 3, stride, 1))
            c_in, h, w = out, (h + stride - 1) // stride, (w + stride - 1) // stride
        decoder = []
        for out in widths[-2::-1] + [c]:
            decoder.append(nn.Conv2d(c_in, out, 3, 1, 1))
            c_in = out
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)
        self.output = output

    def forward(self, x):
        for layer in self.encoder:
            x = torch.relu(layer(x))
        last = len(self.decoder) - 1
        for i, (layer, size) in enumerate(zip(self.decoder, self.sizes[::-1])):
            x = layer(nn.functional.interpolate(x, size=size, mode="nearest"))
            if i < last:
                x = torch.relu(x)
        return torch.sigmoid(x) if self.output == "sigmoid" else x


ZOO.update({"autoencoder": DenseAutoencoder, "conv-autoencoder": ConvAutoencoder})


def default_model(input_shape: tuple[int, ...]) -> str:
    """The zoo model a build uses when none is named: a CNN for images (C, H, W), an MLP otherwise."""
    return "cnn-small" if len(input_shape) == 3 else "mlp"
