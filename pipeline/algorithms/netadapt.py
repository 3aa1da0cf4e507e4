"""Where to remove channels for a latency target: NetAdapt's greedy choice (Yang et al., ECCV 2018).

Each step narrows the one channel group whose next width buys the most measured latency per
validation point lost. Latency comes from the lookup table (``latency_table.py``: the whole model
with only that group narrowed, so a group's saving is ``dense - table[g][w]``, and savings add up);
the accuracy cost of narrowing a group is its validation drop narrowed alone without retraining
(a sensitivity ranking, cheap: one evaluation per group and width; NetAdapt fine-tunes every
candidate briefly, which costs a training run each). The steps form a path from the dense model to
the latency target; the caller then retrains along it and keeps the furthest point within the
accuracy budget (:func:`furthest_within`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# A group whose narrowing costs less than this (points) is ranked as if it cost this: the ratio stays
# finite and a free, fast step still beats a free, slow one.
DROP_FLOOR_PT = 0.05


def estimated_ms(table: dict[str, Any], keep: dict[str, float]) -> float:
    """The table's latency estimate for groups at widths ``keep`` (the others dense): savings add."""
    dense = table["dense_ms"]
    return dense - sum(max(0.0, dense - table["groups"][g]["ms"][str(w)]) for g, w in keep.items() if w < 1.0)


def greedy_path(table: dict[str, Any], drops: dict[str, dict[str, float]], target_ms: float) -> list[dict[str, Any]]:
    """The greedy steps from dense towards ``target_ms``: each ``{"keep": {group: fraction}, "group",
    "estimated_ms"}``. ``drops[g][w]``: validation drop (points) of group ``g`` alone at width ``w``.
    Groups whose narrowing saves no measured time are never narrowed."""
    widths = sorted(table["widths"], reverse=True)
    keep = {g: 1.0 for g in table["groups"]}
    path = []
    while estimated_ms(table, keep) > target_ms:
        best, best_score = None, 0.0
        for g, now in keep.items():
            narrower = [w for w in widths if w < now]
            if not narrower:
                continue
            nxt = narrower[0]
            saved = estimated_ms(table, keep) - estimated_ms(table, {**keep, g: nxt})
            cost = drops[g][str(nxt)] - (drops[g][str(now)] if now < 1.0 else 0.0)
            score = saved / max(cost, DROP_FLOOR_PT)
            if saved > 0 and score > best_score:
                best, best_score = (g, nxt), score
        if best is None:
            break  # every group is at its narrowest or saves nothing more
        keep = {**keep, best[0]: best[1]}
        path.append({"keep": dict(keep), "group": best[0], "estimated_ms": estimated_ms(table, keep)})
    return path


def furthest_within(path: list[dict[str, Any]], trial: Callable[[dict[str, float]], tuple[float, Any]],
                    allowance_pt: float) -> tuple[int | None, Any, list[dict[str, Any]]]:
    """(index of the furthest path point whose drop after ``trial`` (narrow + retrain) is within
    ``allowance_pt``, that trial's result, every trial). The end of the path is tried first (the
    common case: one training run); when it is over the allowance, a binary search over the rest."""
    tried = []

    def attempt(i: int):
        drop, result = trial(path[i]["keep"])
        accepted = drop <= allowance_pt + 1e-9
        tried.append({"step": i, "drop_pt": round(drop, 4), "accepted": accepted})
        return accepted, result

    if not path:
        return None, None, tried
    accepted, result = attempt(len(path) - 1)
    if accepted:
        return len(path) - 1, result, tried
    lo, hi, best = -1, len(path) - 1, None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        accepted, result = attempt(mid)
        if accepted:
            lo, best = mid, result
        else:
            hi = mid
    return (lo if lo >= 0 else None), best, tried
