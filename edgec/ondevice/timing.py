"""Timed loops and latency statistics (benchmark_model / onnxruntime_perf_test conventions).

A loop runs until BOTH its run count and its minimum seconds are reached, or until
``max_seconds`` (then at least one run). Each iteration is timed on its own with
``time.perf_counter_ns``; the garbage collector is off during the loop. Percentiles
use numpy's default (linear interpolation); ``std`` is the population standard deviation.
"""

import gc
import time

import numpy as np


def timed_loop(step, runs, min_seconds=0.0, max_seconds=None):
    """Call ``step()`` repeatedly; returns ``(durations_ns: np.ndarray[int64], elapsed_s)``."""
    runs = max(0, int(runs or 0))
    min_ns = int(max(0.0, float(min_seconds or 0.0)) * 1e9)
    max_ns = int(float(max_seconds) * 1e9) if max_seconds else None
    if runs == 0 and min_ns == 0:
        return np.zeros(0, dtype=np.int64), 0.0
    clock = time.perf_counter_ns
    times = []
    append = times.append
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        n = 0
        while True:
            t0 = clock()
            step()
            t1 = clock()
            append(t1 - t0)
            n += 1
            elapsed = t1 - start
            if n >= runs and elapsed >= min_ns:
                break
            if max_ns is not None and elapsed >= max_ns:
                break
    finally:
        if was_enabled:
            gc.enable()
    return np.asarray(times, dtype=np.int64), (clock() - start) / 1e9


def summarize(durations_ns):
    """Latency stats in ms: ``{"runs", "seconds", "p50", "p90", "p95", "p99", "mean", "std", "min", "max"}``."""
    d = np.asarray(durations_ns, dtype=np.float64) / 1e6
    if d.size == 0:
        return {"runs": 0, "seconds": 0.0, "p50": None, "p90": None, "p95": None, "p99": None,
                "mean": None, "std": None, "min": None, "max": None}
    p50, p90, p95, p99 = (float(v) for v in np.percentile(d, [50, 90, 95, 99]))
    return {"runs": int(d.size), "seconds": float(d.sum() / 1e3), "p50": p50, "p90": p90, "p95": p95,
            "p99": p99, "mean": float(d.mean()), "std": float(d.std()), "min": float(d.min()),
            "max": float(d.max())}


def _noop():
    return None


def harness_overhead_ms(iterations=2000):
    """Median cost in ms of one timed-loop iteration around an empty ``step()`` (timer + call)."""
    d, _ = timed_loop(_noop, iterations)
    return float(np.median(d)) / 1e6


def timer_resolution_ns():
    return float(time.get_clock_info("perf_counter").resolution) * 1e9
