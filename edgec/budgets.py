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
    speedup, speedup_rule = gated_speedup(bench)
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
            out[-1]["rule"] = speedup_rule
    return out


def gated_speedup(bench: dict[str, Any] | None) -> tuple[float | None, str | None]:
    """The speedup ``min_speedup`` judges, and which figure it is: the lower confidence bound of the
    interleaved rounds of ``edgec bench --baseline`` (edgec.ondevice.paired), never the optimistic
    median; a bench result written before paired timing existed falls back to its one p50 ratio."""
    base = (bench or {}).get("baseline") or {}
    paired = base.get("speedup") if isinstance(base.get("speedup"), dict) else None
    if paired and _is_number(paired.get("lower_bound")):
        return float(paired["lower_bound"]), (
            f"{paired.get('confidence', 0):.0%} lower bound of the median of {paired.get('rounds')} interleaved rounds "
            f"(median {paired.get('median', 0):.2f}x, range {paired.get('min', 0):.2f}-{paired.get('max', 0):.2f}x)")
    if _is_number(base.get("speedup_p50")):
        return float(base["speedup_p50"]), "one p50 ratio of two sequential sweeps (bench result without paired rounds)"
    return None, None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
