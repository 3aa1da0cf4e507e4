"""``edgec check``: apply a target's budgets to a bundle (and optionally a bench result)."""

from __future__ import annotations

from typing import Any

from edgec.targets.profile import Budgets


def check_budgets(manifest: dict[str, Any], budgets: Budgets, bench: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per budget: name, limit, actual, ok (None where the figure is unknown)."""
    metrics, size = manifest.get("metrics", {}), manifest.get("size", {})
    p95 = (bench or {}).get("latency_ms", {}).get("p95") if bench else None
    # Other tasks (reconstruction, regression) gate the drop of their headline figure instead.
    drop = metrics["reference_accuracy"] - metrics["accuracy"] if "accuracy" in metrics else metrics.get("metric_drop")
    speedup = ((bench or {}).get("baseline") or {}).get("speedup_p50")  # edgec bench --baseline
    rows = [
        ("max_model_bytes", budgets.max_model_bytes, size.get("model_bytes"), "<="),
        ("max_transport_bytes", budgets.max_transport_bytes, size.get("transport_bytes"), "<="),
        ("max_p95_ms", budgets.max_p95_ms, p95, "<="),
        ("max_accuracy_drop", budgets.max_accuracy_drop, drop, "<="),
        ("min_agreement", budgets.min_agreement, metrics.get("top1_agreement"), ">="),
        ("min_speedup", budgets.min_speedup, speedup, ">="),
    ]
    out = []
    for name, limit, actual, op in rows:
        if limit is None:
            continue
        ok = None if actual is None else (actual <= limit if op == "<=" else actual >= limit)
        out.append({"budget": name, "limit": limit, "actual": actual, "op": op, "ok": ok})
        if name == "min_speedup" and actual is not None:  # both latencies, for the check table and the report
            out[-1]["p50_ms"] = {"bundle": bench["baseline"].get("bundle_p50_ms"), "uncompressed": bench["baseline"].get("p50_ms")}
    return out
