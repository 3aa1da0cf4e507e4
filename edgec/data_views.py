"""Views of a data set that named datasets declare: a subset of classes, a fixed pixel permutation.

``classes = [5, 6]`` keeps those classes, relabelled 0..k-1 in the order given (their names are
kept, so a bundle's labels read "5", "6"); ``permute = SEED`` applies one fixed permutation of the
input features to every split (Permuted-MNIST, Goodfellow et al. 2013). Both are deterministic, so
each view has its own content digest and its own cache keys.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base.data import Dataset
from .base.errors import ConfigError


def select_classes(data: Dataset, classes: list[int], where: str) -> Dataset:
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{where}.classes lists a class twice: {classes}")
    bad = [c for c in classes if not 0 <= c < data.num_classes]
    if bad:
        raise ConfigError(f"{where}.classes: {bad} not in 0..{data.num_classes - 1} (the source {data.name} has "
                          f"{data.num_classes} classes)")
    if len(classes) < 2:
        raise ConfigError(f"{where}.classes: a classifier needs at least 2 classes, got {classes}")
    lookup = np.full(data.num_classes, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))

    def keep(x, y):
        chosen = lookup[y] >= 0
        return x[chosen], lookup[y[chosen]]

    parts = {}
    for split in ("train", "val", "test"):
        x, y = keep(getattr(data, f"x_{split}"), getattr(data, f"y_{split}"))
        if len(y) == 0:
            raise ConfigError(f"{where}.classes {classes}: the {split} split has no sample of these classes")
        parts[f"x_{split}"], parts[f"y_{split}"] = x, y
    return dataclasses.replace(data, name=f"{data.name}[classes {','.join(map(str, classes))}]",
                               labels=tuple(data.labels[c] for c in classes), **parts)


def permute_features(data: Dataset, seed: int) -> Dataset:
    """One fixed permutation of the flattened input features, applied to every split."""
    shape = data.input_shape
    order = np.random.default_rng(seed).permutation(int(np.prod(shape)))

    def apply(x):
        return np.ascontiguousarray(x.reshape(len(x), -1)[:, order].reshape(x.shape))

    return dataclasses.replace(data, name=f"{data.name}[permute {seed}]", x_train=apply(data.x_train),
                               x_val=apply(data.x_val), x_test=apply(data.x_test))
