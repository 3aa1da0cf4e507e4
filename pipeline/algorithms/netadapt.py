"""Where to remove channels for a latency target: NetAdapt's greedy choice (Yang et al., ECCV 2018).

Each step narrows the one channel group whose next width buys the most measured latency per
validation point lost. Latency comes from the lookup table (``latency_table.py``: the whole model
with only that group narrowed, so a group's saving is ``dense - table[g][w]``, and savings add up);
the accuracy cost of narrowing a group is its validation drop narrowed alone without retraining
(a sensitivity ranking, cheap: one evaluation per group and width; NetAdapt fine-tunes every
candidate briefly, which costs a training run each). The steps form a path from the dense model to
the latency target; the caller then retrains along it and keeps the furthest point within the
accuracy budget (:func:`furthest_within`).

The table's additive estimate only ranks the steps. Savings do not add: narrowing one group also
shrinks its neighbours' inputs, and a runtime's fixed per-operator cost stays (the ResNet-18-style
model here: table estimate 2x, the narrowed model measured 1.3x). So each candidate whose estimate
reaches the target is exported and timed in the real runtime (``measure``), and the path goes on
until the *measured* latency meets the target or no group can be narrowed any more. After a
measurement the estimate's savings are scaled by the fraction of them the measurement realized, so
the next candidate is timed where the corrected estimate reaches the target, not at every step (a
MobileNetV2's estimate summed to 2.6x its dense latency, and each timing costs a conversion).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

# A group whose narrowing costs less than this (points) is ranked as if it cost this: the ratio stays
# finite and a free, fast step still beats a free, slow one.
DROP_FLOOR_PT = 0.05
MAX_PATHS = 3  # paths walked when the recovered model measures short of the target, each aimed lower


def estimated_ms(table: dict[str, Any], keep: dict[str, float]) -> float:
    """The table's latency estimate for groups at widths ``keep`` (the others dense): savings add."""
    dense = table["dense_ms"]
    return dense - sum(max(0.0, dense - table["groups"][g]["ms"][str(w)]) for g, w in keep.items() if w < 1.0)


def greedy_path(table: dict[str, Any], drops: dict[str, dict[str, float]], target_ms: float,
                measure: Callable[[dict[str, float]], float] | None = None) -> list[dict[str, Any]]:
    """The greedy steps from dense towards ``target_ms``: each ``{"keep": {group: fraction}, "group",
    "estimated_ms"}``, plus ``"measured_ms"`` where ``measure(keep) -> ms`` timed it. ``drops[g][w]``:
    validation drop (points) of group ``g`` alone at width ``w``. With ``measure``, the path ends at the
    first point measured within the target (or where nothing is left to narrow); without it, where the
    estimate is, and groups whose narrowing the table saw save no time are never narrowed. With
    ``measure`` they are, last, cheapest in accuracy first, each step measured: a group's saving alone
    can be under the table's noise (on a ResNet-18 at 7.5 ms dense, three of twelve single-group
    timings came out slower than dense, and the other nine narrowed measured 1.84x of the 4.3x the
    table saw with every group narrowed)."""
    keep = {g: 1.0 for g in table["groups"]}
    path: list[dict[str, Any]] = []
    dense, realized = table["dense_ms"], 1.0  # realized: measured / estimated saving at the last measured point
    while not _reached(table, path, target_ms, measured=measure is not None):
        group = _best_step(table, drops, keep)
        unranked = group is None and measure is not None
        if unranked:
            group = _cheapest_step(table, drops, keep)
        if group is None:  # every group is at its narrowest (or, by the estimate alone, saves nothing more)
            if measure is not None and path and "measured_ms" not in path[-1]:
                path[-1]["measured_ms"] = float(measure(path[-1]["keep"]))
            break
        keep = {**keep, group: _narrower(table, keep[group])}
        point = {"keep": dict(keep), "group": group, "estimated_ms": estimated_ms(table, keep)}
        if measure is not None and (unranked or dense - (dense - point["estimated_ms"]) * realized <= target_ms):
            point["measured_ms"] = float(measure(keep))
            if point["estimated_ms"] < dense:
                realized = min(1.0, max(0.0, dense - point["measured_ms"]) / (dense - point["estimated_ms"]))
        path.append(point)
    return path


def _reached(table: dict[str, Any], path: list[dict[str, Any]], target_ms: float, measured: bool) -> bool:
    if not path:
        return table["dense_ms"] <= target_ms
    return path[-1].get("measured_ms" if measured else "estimated_ms", float("inf")) <= target_ms


def _narrower(table: dict[str, Any], now: float) -> float | None:
    return next((w for w in sorted(table["widths"], reverse=True) if w < now), None)


def _best_step(table: dict[str, Any], drops: dict[str, dict[str, float]], keep: dict[str, float]) -> str | None:
    """The group whose next narrower width saves the most estimated latency per validation point lost."""
    best, best_score = None, 0.0
    for g, now in keep.items():
        nxt = _narrower(table, now)
        if nxt is None:
            continue
        saved = estimated_ms(table, keep) - estimated_ms(table, {**keep, g: nxt})
        cost = drops[g][str(nxt)] - (drops[g][str(now)] if now < 1.0 else 0.0)
        score = saved / max(cost, DROP_FLOOR_PT)
        if saved > 0 and score > best_score:
            best, best_score = g, score
    return best


def _cheapest_step(table: dict[str, Any], drops: dict[str, dict[str, float]], keep: dict[str, float]) -> str | None:
    """The group whose next narrower width costs the least validation accuracy (ties: the first by name)."""
    steps = [(drops[g][str(nxt)] - (drops[g][str(now)] if now < 1.0 else 0.0), g)
             for g, now in sorted(keep.items()) if (nxt := _narrower(table, now)) is not None]
    return min(steps)[1] if steps else None


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


class PathChoice(NamedTuple):
    """What :func:`furthest_meeting_target` kept: the path, its chosen step (None: none recovered
    within the allowance), that step's trial result, every trial, the recovered model's latency as
    judged (None without a chosen step) and one record per path walked."""

    path: list[dict[str, Any]]
    index: int | None
    result: Any
    trials: list[dict[str, Any]]
    final_ms: float | None
    paths: list[dict[str, Any]]


def furthest_meeting_target(path_for: Callable[[float], list[dict[str, Any]]],
                            trial: Callable[[dict[str, float]], tuple[float, Any]], allowance_pt: float,
                            final_ms: Callable[[Any], float], target_ms: float, max_paths: int = MAX_PATHS):
    """The path towards ``target_ms`` (``path_for(aim_ms)``), its furthest point within the accuracy
    allowance (:func:`furthest_within`), and that recovered model's latency as judged (``final_ms``).
    A path ends where a measurement *before* recovery met the target; measured again after it (or at a
    busier moment: a ResNet-18 path met 2x on its bound, the recovered model's bound said 1.59x) it can
    fall short. Then, where accuracy allowed the path's end, a path aimed lower by the shortfall is
    walked and recovered, up to ``max_paths`` paths, until one meets the target or nothing narrower is
    left; of the recovered models the fastest is kept (a :class:`PathChoice`)."""
    aim, aims, kept = target_ms, [], None
    while True:
        path = path_for(aim)
        if kept is not None and (not path or path[-1]["keep"] == kept.path[-1]["keep"]):
            return kept  # the lower aim reaches no narrower model
        index, result, tried = furthest_within(path, trial, allowance_pt)
        ms = final_ms(result) if index is not None else None
        aims.append({"aim_ms": aim, "path_steps": len(path), "chosen_step": index, "final_ms": ms})
        if kept is None or (ms is not None and ms < kept.final_ms):
            kept = PathChoice(path, index, result, tried, ms, aims)
        if ms is None or ms <= target_ms + 1e-12 or index < len(path) - 1 or len(aims) >= max_paths:
            return kept
        aim *= target_ms / ms
