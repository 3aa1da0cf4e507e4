"""Paired, interleaved timing of two bundles: a speedup that survives a busy machine.

Two sweeps run one after the other compare p50s taken seconds or minutes apart; on a shared machine
the load changes in between and the ratio moves with it (the same two ResNet-8 bundles measured
0.98x on one loaded host and 2.03x on another). Here both models are loaded in one process at their
chosen settings and timed in alternating rounds (A B, B A, A B, ...: the order alternates so a
steady drift favours neither), so each round compares the two under the same load. A round gives
one ratio of p50s (slow / fast); the result reports their median and spread and a conservative
figure for gates: a distribution-free one-sided lower confidence bound of the median ratio, the
k-th smallest of n round ratios with P(Binomial(n, 1/2) < k) <= 1 - confidence (for 9 rounds at
95%: the 2nd smallest, true confidence 98%). It needs no assumption about the noise's shape.

numpy only: this module ships in every bundle (``run.py bench --against``).
"""

import math

import numpy as np

from .timing import timed_loop

DEFAULT_ROUNDS = 9
DEFAULT_CONFIDENCE = 0.95
BOUND_RULE = ("k-th smallest of the per-round ratios, k the largest with P(Binomial(rounds, 1/2) < k) "
              "<= 1 - confidence: a distribution-free lower confidence bound of the median ratio")


def lower_bound_rank(rounds, confidence=DEFAULT_CONFIDENCE):
    """``(k, achieved_confidence)``: the 1-based rank of the order statistic that bounds the median
    from below with at least ``confidence``; ``(1, c)`` with c < confidence when ``rounds`` is too
    few for any rank to reach it (then the minimum is the most conservative figure there is)."""
    n = int(rounds)
    if n < 1:
        raise ValueError("rounds must be >= 1")
    alpha = 1.0 - float(confidence)
    cdf, k = 0.0, 0
    for i in range(n + 1):  # cdf = P(X <= i - 1) before adding P(X = i)
        if cdf + math.comb(n, i) / 2.0 ** n > alpha:
            break
        cdf += math.comb(n, i) / 2.0 ** n
        k = i + 1
    if k == 0:
        return 1, 1.0 - 1.0 / 2.0 ** n
    return k, 1.0 - cdf


def summarize_ratios(ratios, confidence=DEFAULT_CONFIDENCE):
    """Median, spread and the lower confidence bound of per-round ratios."""
    r = np.sort(np.asarray(ratios, dtype=np.float64))
    k, achieved = lower_bound_rank(r.size, confidence)
    return {"rounds": int(r.size), "ratios": [float(v) for v in r], "median": float(np.median(r)),
            "min": float(r[0]), "max": float(r[-1]),
            "spread": float((r[-1] - r[0]) / np.median(r)) if np.median(r) > 0 else None,
            "lower_bound": float(r[k - 1]), "confidence": float(achieved), "bound_rank": int(k),
            "bound_rule": BOUND_RULE}


def _step_for(bundle, settings, runtime):
    from .bench import _probe_vectors  # the same inputs the sweep times
    model = bundle.open_model(settings, runtime=runtime)
    if model.batch_size not in (None, 1):
        model.set_batch_size(1)
    _, xs = _probe_vectors(bundle, model)
    step = model.prepare(xs[:1])
    step()
    return model, step


def paired_speedup(slow_bundle, slow_settings, fast_bundle, fast_settings, runtime=None, rounds=DEFAULT_ROUNDS,
                   runs=50, min_seconds=0.2, max_seconds=10.0, warmup=10, confidence=DEFAULT_CONFIDENCE):
    """Time ``slow`` and ``fast`` (loaded Bundle objects) in interleaved rounds; the speedup is slow
    p50 / fast p50 per round. Returns ``summarize_ratios`` plus each side's p50 per round (ms) and
    the median of those."""
    slow_model, slow_step = _step_for(slow_bundle, slow_settings, runtime)
    fast_model, fast_step = _step_for(fast_bundle, fast_settings, runtime)
    try:
        for step in (slow_step, fast_step):
            timed_loop(step, warmup, 0.1, max_seconds)
        p50 = {"slow": [], "fast": []}
        for i in range(int(rounds)):
            order = (("slow", slow_step), ("fast", fast_step))
            for name, step in (order if i % 2 == 0 else order[::-1]):
                d, _ = timed_loop(step, runs, min_seconds, max_seconds)
                p50[name].append(float(np.median(d)) / 1e6)
    finally:
        slow_model.close()
        fast_model.close()
    ratios = [s / f for s, f in zip(p50["slow"], p50["fast"]) if f > 0]
    out = summarize_ratios(ratios, confidence)
    out.update(slow_p50_ms=p50["slow"], fast_p50_ms=p50["fast"], slow_median_p50_ms=float(np.median(p50["slow"])),
               fast_median_p50_ms=float(np.median(p50["fast"])), runs_per_round=int(runs),
               min_seconds_per_round=float(min_seconds), order="alternating (A B, B A, ...)")
    return out
