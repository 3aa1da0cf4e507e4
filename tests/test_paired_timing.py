"""Interleaved A/B timing (edgec.ondevice.paired): the order-statistic bound and a real paired run."""

import math

import numpy as np
import pytest

from edgec.ondevice.paired import lower_bound_rank, summarize_ratios


def _binom_cdf(n, k):
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


@pytest.mark.parametrize("n", range(1, 25))
def test_the_bound_rank_is_the_largest_that_keeps_the_confidence(n):
    k, achieved = lower_bound_rank(n, 0.95)
    if n < 5:  # 1/2^n > 5%: no order statistic reaches 95%; the minimum is used and its confidence told
        assert k == 1 and achieved == pytest.approx(1 - 0.5 ** n) and achieved < 0.95
        return
    assert achieved == pytest.approx(1 - _binom_cdf(n, k - 1)) and achieved >= 0.95
    assert 1 - _binom_cdf(n, k) < 0.95  # one rank higher would not hold


def test_nine_rounds_bound_with_the_second_smallest():
    assert lower_bound_rank(9, 0.95) == (2, pytest.approx(1 - 10 / 512))
    s = summarize_ratios([2.0, 1.0, 3.0, 2.5, 2.2, 1.8, 2.1, 2.4, 2.3])
    assert s["lower_bound"] == 1.8 and s["median"] == 2.2 and s["min"] == 1.0 and s["max"] == 3.0


def test_a_bundle_timed_against_itself_is_about_one(tmp_path):
    """Real runtime, real bundle: the same model on both sides gives ratios around 1 and a bound below
    the median (nothing here is mocked; the tolerance is wide because the machine is shared)."""
    from edgec.api import build
    from edgec.ondevice import load_bundle
    from edgec.ondevice.paired import paired_speedup

    result = build({"model": {"name": "mlp"}, "stages": [{"kind": "train", "epochs": 1},
                                                         {"kind": "export", "eval_samples": 50}]},
                   target="rpi", out=tmp_path / "out", cache_dir=tmp_path / "cache")
    bundle = load_bundle(str(result.bundle))
    out = paired_speedup(bundle, {"threads": 1}, bundle, {"threads": 1}, rounds=5, runs=20, min_seconds=0.02)
    assert out["rounds"] == 5 and len(out["slow_p50_ms"]) == 5 and len(out["fast_p50_ms"]) == 5
    assert out["slow_median_p50_ms"] == pytest.approx(float(np.median(out["slow_p50_ms"])))
    assert out["fast_median_p50_ms"] == pytest.approx(float(np.median(out["fast_p50_ms"])))
    assert out["lower_bound"] <= out["median"] and 0.3 < out["median"] < 3.0
