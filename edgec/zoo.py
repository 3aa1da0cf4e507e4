"""Built-in models. Each adapts to the data's input shape and class count.

Layer attribute names (``fc1``, ``conv2``...) are the names users give to per-layer pruning and
weight-sharing settings, so they are stable and follow the papers where one exists.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError


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


ZOO: dict[str, Callable[..., nn.Module]] = {
    "lenet-300-100": LeNet300100,
    "lenet-5": LeNet5,
    "mlp": MLP,
    "cnn-small": CNNSmall,
}
