"""Feasibility, Pareto fronts and the best-point rule, per target.

Accuracy here is always the bundle's validation accuracy (selection never looks at the test split;
the test accuracy is what the report shows). Latencies are measurements: two within
``latency_tolerance`` of each other tie, so timing noise alone neither puts a point on the front
nor takes one off it.
"""

from __future__ import annotations

from typing import Any, Iterable

from .space import LATENCY_OBJECTIVES, OBJECTIVES, BestRule, Constraints

DIRECTIONS = {**OBJECTIVES, "test_accuracy": "max", "ratio": "max"}


def limits(budgets: Any, constraints: Constraints) -> dict[str, float]:
    """The target's size / latency budgets with the search's constraints laid over them."""
    out: dict[str, float] = {}
    for key in ("max_model_bytes", "max_transport_bytes", "max_p95_ms"):
        value = getattr(budgets, key, None)
        if value is not None:
            out[key] = value
    for key, value in constraints.model_dump().items():
        if value is not None:
            out[key] = value
    return out


_CHECKS = {
    "max_model_bytes": ("model_bytes", "<="),
    "max_transport_bytes": ("transport_bytes", "<="),
    "max_p95_ms": ("p95_ms", "<="),
    "max_p50_ms": ("p50_ms", "<="),
    "min_accuracy": ("accuracy", ">="),
}


def violations(target_record: dict[str, Any], bounds: dict[str, float]) -> list[str]:
    """Why a trial's build for a target is not a valid point ([] when it is). The export stage has
    already enforced the export-parity budgets (it refuses to ship otherwise); the accuracy budget is
    recorded per point (``within_accuracy_budget``), not enforced, unless the search config sets
    ``[budget] enforce``."""
    if target_record.get("status") != "ok":
        return [target_record.get("reason") or target_record.get("status", "not built")]
    metrics = target_record["metrics"]
    out = []
    for key, limit in bounds.items():
        figure, op = _CHECKS[key]
        value = metrics.get(figure)
        if value is None:
            continue
        if (op == "<=" and value > limit) or (op == ">=" and value < limit):
            out.append(f"{figure} {value:.6g} {'>' if op == '<=' else '<'} {key} {limit:g}")
    return out


def _compare(a: float, b: float, direction: str, tolerance: float) -> int:
    """1 when a is better than b, -1 when worse, 0 when they tie."""
    if tolerance > 0:
        if a <= b * (1 + tolerance) and b <= a * (1 + tolerance):
            return 0
    if a == b:
        return 0
    better = a > b if direction == "max" else a < b
    return 1 if better else -1


def dominates(a: dict[str, Any], b: dict[str, Any], objectives: Iterable[str], latency_tolerance: float) -> bool:
    """a is no worse than b on every objective and better on at least one."""
    strictly = False
    for name in objectives:
        tol = latency_tolerance if name in LATENCY_OBJECTIVES else 0.0
        c = _compare(a[name], b[name], DIRECTIONS[name], tol)
        if c < 0:
            return False
        strictly = strictly or c > 0
    return strictly


def pareto_front(points: dict[str, dict[str, Any]], objectives: list[str], latency_tolerance: float) -> list[str]:
    """The ids of the points no other point dominates, best first on the first objective."""
    front = [pid for pid, m in points.items()
             if not any(dominates(other, m, objectives, latency_tolerance) for oid, other in points.items() if oid != pid)]
    first = objectives[0]
    sign = -1 if DIRECTIONS[first] == "max" else 1
    return sorted(front, key=lambda pid: (sign * points[pid][first], pid))


def baseline_accuracy(records: list[dict[str, Any]], target: str) -> float | None:
    """The best validation accuracy of an uncompressed model (the chain's first model stage) among the
    trials: the reference for ``max_accuracy_drop``."""
    values = [r["targets"][target]["metrics"].get("trained_val_accuracy") for r in records
              if r["targets"].get(target, {}).get("status") == "ok"]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def select_best(candidates: dict[str, dict[str, Any]], rule: BestRule, baseline: float | None,
                order: dict[str, int]) -> str | None:
    """The feasible point the rule picks (ties: higher accuracy, then lower p50, then trial number)."""
    eligible = dict(candidates)
    if rule.max_accuracy_drop is not None and baseline is not None:
        floor = baseline - rule.max_accuracy_drop - 1e-12
        eligible = {pid: m for pid, m in eligible.items() if m["accuracy"] >= floor}
    if not eligible:
        return None
    sign = 1 if rule.direction == "min" else -1
    return min(eligible, key=lambda pid: (sign * eligible[pid][rule.figure], -eligible[pid]["accuracy"],
                                          eligible[pid].get("p50_ms") or 0.0, order.get(pid, 0)))
