"""Choosing the representative samples that calibrate int8 activation ranges, and naming them.

Stratifying by class matters on small calibration sets: ranges observed on a few classes only
clip the activations of the others, which shows up as lost top-1 agreement after int8.
"""

from __future__ import annotations

import hashlib

import numpy as np


def select_calibration_indices(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Class-stratified, deterministic choice of ``count`` indices into ``labels``.

    Every class gets an equal share (shares differ by at most one); a class with fewer samples
    than its share gives all it has and the rest is spread over the others. Which samples of a
    class are taken, and which classes get the leftover ones, depend only on ``seed``. A
    ``count`` above ``len(labels)`` selects every index. Returns sorted int64 indices.
    """
    labels = np.asarray(labels)
    if count < 1:
        raise ValueError(f"calibration count must be at least 1, got {count}")
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    _, class_of = np.unique(labels, return_inverse=True)
    members = [rng.permutation(np.flatnonzero(class_of == c)) for c in range(class_of.max() + 1)]
    quota = _quotas(np.array([len(m) for m in members]), min(count, labels.size), rng)
    chosen = np.concatenate([m[:q] for m, q in zip(members, quota)])
    return np.sort(chosen).astype(np.int64)


def _quotas(sizes: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``count`` over classes of ``sizes`` as equally as their sizes allow (water filling)."""
    quota = np.zeros_like(sizes)
    remaining = count
    while remaining:
        open_classes = np.flatnonzero(quota < sizes)
        share = remaining // len(open_classes)
        if share == 0:
            quota[rng.choice(open_classes, size=remaining, replace=False)] += 1
            break
        added = np.minimum(share, sizes[open_classes] - quota[open_classes])
        quota[open_classes] += added
        remaining -= int(added.sum())
    return quota


def calibration_digest(x: np.ndarray) -> str:
    """sha256 hex of the samples' dtype, shape and bytes: names a calibration set in lineage."""
    h = hashlib.sha256()
    h.update(f"{x.dtype}{x.shape}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def quantile_bins(values: np.ndarray, bins: int = 10) -> np.ndarray:
    """Bin index (0..bins-1) of each value by the values' own quantiles: stratifying a continuous
    quantity (a regression target) with :func:`select_calibration_indices` spreads the chosen
    samples over its whole range."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("values must not be empty")
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").astype(np.int64)
