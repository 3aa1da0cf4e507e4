"""Calibration sample selection, digests and the onnxruntime calibration reader."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.calibration.readers import OnnxCalibrationReader
from edgec.calibration.samples import calibration_digest, select_calibration_indices


def _labels(counts: dict[int, int], seed: int = 1) -> np.ndarray:
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.random.default_rng(seed).permutation(labels)


def test_selection_is_equal_per_class_sorted_and_unique():
    labels = _labels({0: 50, 1: 80, 2: 40, 3: 60})
    chosen = select_calibration_indices(labels, 40)
    assert chosen.dtype == np.int64
    assert np.all(np.diff(chosen) > 0)
    assert np.bincount(labels[chosen]).tolist() == [10, 10, 10, 10]


def test_small_classes_give_all_they_have_and_the_rest_is_spread():
    labels = _labels({0: 2, 1: 100, 2: 100, 3: 5})
    chosen = select_calibration_indices(labels, 41)
    per_class = np.bincount(labels[chosen], minlength=4)
    assert per_class[0] == 2 and per_class[3] == 5
    assert sorted(per_class[1:3].tolist()) == [17, 17]
    assert per_class.sum() == 41


def test_leftover_samples_differ_by_at_most_one_per_class():
    labels = _labels({c: 30 for c in range(7)})
    per_class = np.bincount(labels[select_calibration_indices(labels, 24)], minlength=7)
    assert per_class.sum() == 24 and per_class.max() - per_class.min() <= 1


def test_selection_is_deterministic_and_seeded():
    labels = _labels({c: 40 for c in range(10)})
    a = select_calibration_indices(labels, 30, seed=3)
    assert np.array_equal(a, select_calibration_indices(labels, 30, seed=3))
    assert not np.array_equal(a, select_calibration_indices(labels, 30, seed=4))


def test_count_above_the_population_selects_everything():
    labels = _labels({0: 3, 1: 4})
    assert select_calibration_indices(labels, 100).tolist() == list(range(7))


def test_string_labels_work():
    labels = np.array(["cat", "dog", "dog", "cat", "bird", "dog"])
    chosen = select_calibration_indices(labels, 3)
    assert sorted(labels[chosen].tolist()) == ["bird", "cat", "dog"]


@pytest.mark.parametrize("labels, count", [(np.array([0, 1]), 0), (np.array([], dtype=int), 5), (np.zeros((2, 2)), 1)])
def test_invalid_requests_raise(labels, count):
    with pytest.raises(ValueError):
        select_calibration_indices(labels, count)


def test_digest_depends_on_content_dtype_and_shape():
    x = np.arange(12, dtype=np.float32)
    d = calibration_digest(x)
    assert len(d) == 64 and d == calibration_digest(x.copy())
    assert d != calibration_digest(x.reshape(3, 4))
    assert d != calibration_digest(x.astype(np.float64))
    y = x.copy()
    y[5] += 1
    assert d != calibration_digest(y)
    assert calibration_digest(x.reshape(3, 4).T) == calibration_digest(np.ascontiguousarray(x.reshape(3, 4).T))


def test_reader_feeds_batch1_float32_under_the_input_name_and_rewinds():
    samples = np.arange(3 * 4, dtype=np.float64).reshape(3, 1, 2, 2)
    reader = OnnxCalibrationReader(samples, "input")
    assert len(reader) == 3
    fed = list(reader)
    assert [list(f) for f in fed] == [["input"]] * 3
    assert all(f["input"].shape == (1, 1, 2, 2) and f["input"].dtype == np.float32 for f in fed)
    assert np.array_equal(np.concatenate([f["input"] for f in fed]), samples.astype(np.float32))
    assert reader.get_next() is None
    reader.rewind()
    assert np.array_equal(reader.get_next()["input"], samples[:1].astype(np.float32))
