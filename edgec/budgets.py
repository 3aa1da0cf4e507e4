"""``edgec check``: apply a target's budgets to a bundle (and optionally a bench result)."""

from __future__ import annotations

from typing import Any

from edgec.targets.profile import Budgets


def check_budgets(manifest: dict[str, Any], budgets: Budgets, bench: dict[str, Any] | None,
                  max_drop: float | None = None) -> list[dict[str, Any]]:
    """One row per budget: name, limit, actual, ok (None where the figure is unknown). ``max_drop``
    (points): the accuracy budget against the trained model, default the one the build applied."""
    metrics, size = manifest.get("metrics", {}), manifest.get("size", {})
    accuracy_budget = manifest.get("accuracy_budget") or {}
    max_drop = accuracy_budget.get("budget_pt") if max_drop is None else max_drop
    p95 = (bench or {}).get("latency_ms", {}).get("p95") if bench else None
    # Other tasks (reconstruction, regression) gate the drop of their headline figure instead.
    drop = metrics["reference_accuracy"] - metrics["accuracy"] if "accuracy" in metrics else metrics.get("metric_drop")
    speedup = ((bench or {}).get("baseline") or {}).get("speedup_p50")  # edgec bench --baseline
    rows = [
        ("max_model_bytes", budgets.max_model_bytes, size.get("model_bytes"), "<="),
        ("max_transport_bytes", budgets.max_transport_bytes, size.get("transport_bytes"), "<="),
        ("max_p95_ms", budgets.max_p95_ms, p95, "<="),
        ("max_drop", max_drop, accuracy_budget.get("drop_pt"), "<="),
        ("max_export_drop", budgets.max_export_drop, drop, "<="),
        # bundles made before the margin-aware gate record only the raw agreement
        ("min_agreement", budgets.min_agreement, metrics.get("decided_agreement", metrics.get("top1_agreement")), ">="),
        ("min_logit_snr_db", budgets.min_logit_snr_db, metrics.get("logit_snr_db"), ">="),
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
