"""The accuracy budget: how much of the trained model's validation metric the bundle may lose.

Measured on the VALIDATION split (the test split stays held out; it is reported beside), against the
*trained* model: the first train stage's output, or the source model when the chain has no train
stage (a user's ``--weights``). The figure is the task's headline (``edgec/ondevice/metrics.py``):
top-1 accuracy for classification, R^2 for regression, ROC AUC for reconstruction with marked
anomalies, all in points (x100); a reconstruction without anomalies is judged by its MSE, whose
drop is its relative increase in percent.

Precedence of the budget (points): ``--max-drop`` / edgec.toml ``[budget] max_accuracy_drop``,
else the target profile's ``[budget] max_accuracy_drop``, else :data:`DEFAULT_MAX_DROP_PT`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from edgec.base.data import Dataset
from edgec.base.errors import RunError
from edgec.ondevice import metrics as M

DEFAULT_MAX_DROP_PT = 1.0
# How the chain spends the budget (fractions of it, in chain order). Shares are cumulative and
# counted from the trained model: after a budgeted stage the model may have lost its own share plus
# every earlier one (:func:`allowance_pt`), so what an earlier stage left unused (or gained) passes
# on. A distill stage without an explicit width picks the narrowest student within its share; a
# prune stage without an explicit sparsity (or channel ratio) the largest level that recovers within
# its own; a share stage without explicit bits the fewest bits per layer within its own; an int8
# export over the whole budget keeps its worst layers float where that meets it.
ALLOCATION = {"distill": 0.25, "prune": 0.25, "share": 0.25, "quantization": 0.25}


def resolve_budget(configured: float | None, profile) -> tuple[float, str]:
    """(budget in points, where it came from)."""
    if configured is not None:
        return float(configured), "config"
    from_target = getattr(getattr(profile, "budget", None), "max_accuracy_drop", None)
    if from_target is not None:
        return float(from_target), f"target {profile.name}"
    return DEFAULT_MAX_DROP_PT, "default"


def allowance_pt(part: str, budget_pt: float) -> float:
    """How far below the trained model's validation figure (points) the model may be after ``part``:
    its share of the budget plus every earlier part's."""
    parts = list(ALLOCATION)
    return budget_pt * sum(ALLOCATION[p] for p in parts[:parts.index(part) + 1])


def reference_index(kinds: list[str]) -> int | None:
    """The index of the stage whose output is the trained reference (the first train stage); None:
    the chain's source model (a user's ``--weights``) is the reference."""
    return next((i for i, kind in enumerate(kinds) if kind == "train"), None)


def headline(data: Dataset, outputs: np.ndarray, split: str) -> tuple[str, float | None, bool]:
    """(metric name, value, higher is better) of model ``outputs`` on ``split`` ("val" | "test")."""
    y = getattr(data, f"y_{split}")
    if data.task == "classification":
        return "accuracy", float((np.asarray(outputs).argmax(1) == y).mean()), True
    from .objectives import objective_for

    figures = objective_for(data).outputs_metrics(np.asarray(outputs), split)
    return M.headline(data.task, figures)


def drop_points(reference: float, value: float, higher: bool) -> float:
    """The loss from ``reference`` to ``value`` in points (errors: percent of the reference)."""
    if higher:
        return 100.0 * (reference - value)
    return 100.0 * (value - reference) / max(abs(reference), 1e-12)


def model_headline(model: nn.Module, data: Dataset, split: str) -> tuple[str, float | None, bool]:
    from .inference import predict

    return headline(data, predict(model, getattr(data, f"x_{split}"), data).numpy(), split)


def true_class_confidence(model: nn.Module, data: Dataset) -> float | None:
    """Classification: the mean probability the model gives the true class on validation (None
    otherwise). Budgeted stages guard it beside accuracy, which a small or saturated validation split
    cannot see damage in (algorithms/sensitivity.py)."""
    if data.task != "classification":
        return None
    import torch

    from .inference import predict

    probabilities = torch.softmax(predict(model, data.x_val, data), dim=1)
    return float(probabilities[torch.arange(len(data.y_val)), torch.as_tensor(data.y_val)].mean())


def reference_headline(reference, data: Dataset, trust) -> tuple[str, float | None, bool]:
    """The trained reference's (an Artifact's) validation headline: what budgeted stages are judged against."""
    return model_headline(reference.checkpoint().build(trust), data, "val")



@dataclass(frozen=True)
class StageBaseline:
    """What a budgeted stage judges its candidates against, on the validation split."""

    data: Dataset
    entering: float  # the model the stage received
    reference: float  # the trained reference (the entering model where the chain has none)
    higher: bool
    allowance: float  # how far below ``reference`` a kept candidate may be (allowance_pt)
    confidence: float | None  # the entering model's true-class confidence (classification)

    def drop(self, candidate: nn.Module, base: float | None = None) -> float:
        """Points ``candidate`` lost from ``base`` (default: the trained reference)."""
        value = model_headline(candidate, self.data, "val")[1]
        return drop_points(self.reference if base is None else base, value, self.higher)

    def judge(self, candidate: nn.Module, guard_pt: float) -> dict[str, Any]:
        """{drop_pt, confidence_drop_pt (classification), accepted}: kept when within the allowance and,
        for classification, within ``guard_pt`` of the entering true-class confidence."""
        figures: dict[str, Any] = {"drop_pt": round(self.drop(candidate), 4)}
        accepted = figures["drop_pt"] <= self.allowance + 1e-9
        if self.confidence is not None:
            lost = self.confidence - true_class_confidence(candidate, self.data)
            figures["confidence_drop_pt"] = round(100 * lost, 4)
            accepted = accepted and figures["confidence_drop_pt"] <= guard_pt
        return {**figures, "accepted": accepted}


def stage_baseline(model: nn.Module, ctx, part: str) -> StageBaseline:
    """The baseline of budget ``part`` (accuracy_budget.ALLOCATION) for ``model`` entering it."""
    model.eval()
    _, entering, higher = model_headline(model, ctx.data, "val")
    reference = entering if ctx.reference is None else reference_headline(ctx.reference, ctx.data, ctx.trust)[1]
    return StageBaseline(ctx.data, entering, reference, higher, allowance_pt(part, ctx.budget_pt),
                         true_class_confidence(model, ctx.data))

def stage_metric(info: dict[str, Any], metric: str) -> float | None:
    """A stage's validation figure from its recorded info (model_info / the export stage)."""
    value = info.get(f"val_{metric}")
    return float(value) if isinstance(value, (int, float)) else None


def budget_record(*, metric: str, higher: bool, reference_val: float, reference_test: float | None,
                  bundle_val: float, bundle_test: float | None, budget_pt: float, source: str, enforce: bool,
                  reference_stage: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """What build.json and the manifest record as ``accuracy_budget``."""
    drop = drop_points(reference_val, bundle_val, higher)
    return {
        "metric": metric,
        "split": "val",
        "reference_stage": reference_stage,
        "reference": reference_val,
        "reference_test": reference_test,
        "bundle_val": bundle_val,
        "bundle_test": bundle_test,
        "drop_pt": round(drop, 4),
        "budget_pt": budget_pt,
        "budget_source": source,
        "enforced": enforce,
        "allocation": {part: share * budget_pt for part, share in ALLOCATION.items()},
        "met": drop <= budget_pt + 1e-9,
        "stages": stages,
    }


def stage_trajectory(steps: list, metric: str, higher: bool, reference_val: float) -> list[dict[str, Any]]:
    """The validation figure after every stage (after the reference) that records one, with its drop."""
    out = []
    for step in steps:
        value = stage_metric(step.artifact.info, metric)
        if value is not None:
            out.append({"stage": step.id, "kind": step.kind, "val": value,
                        "drop_pt": round(drop_points(reference_val, value, higher), 4)})
    return out


def summary_line(record: dict[str, Any]) -> str:
    """``accuracy 97.2% (trained 97.5%, -0.3 pt, budget 1.0 pt)`` (validation figures)."""
    metric = record["metric"]
    shown = (lambda v: f"{100 * v:.1f}%") if metric == "accuracy" else (lambda v: f"{v:.4f}")
    verdict = "" if record["met"] else " OVER BUDGET"
    return (f"{metric} {shown(record['bundle_val'])} (trained {shown(record['reference'])}, "
            f"{0.0 - record['drop_pt']:+.1f} pt, budget {record['budget_pt']:.1f} pt) on validation{verdict}")


def refuse_over_budget(record: dict[str, Any]) -> None:
    """RunError (nothing published) when the bundle lost more than the budget and it is enforced."""
    if record["met"] or not record["enforced"]:
        return
    tried = " -> ".join(s["stage"] for s in record["stages"]) or "the chain"
    fmt = (lambda v: f"{100 * v:.1f}%") if record["metric"] == "accuracy" else (lambda v: f"{v:.4f}")
    best = min(record["stages"], key=lambda s: s["drop_pt"], default=None)
    best_text = f"; best point after {best['stage']}: {fmt(best['val'])} ({0.0 - best['drop_pt']:+.1f} pt)" if best else ""
    raise RunError(
        f"accuracy budget not met: bundle {record['metric']} {fmt(record['bundle_val'])} on validation vs trained "
        f"{fmt(record['reference'])} ({0.0 - record['drop_pt']:+.1f} pt > budget {record['budget_pt']:.1f} pt); tried {tried}"
        f"{best_text}; nothing published. Leave sparsity/bits at their budgeted defaults, train longer, or raise "
        f"the budget (--max-drop)")


def measure(steps: list, source, data: Dataset, trust, budget_pt: float, budget_source: str,
            enforce: bool) -> dict[str, Any] | None:
    """The budget record of a chain that ends in a single-task bundle (None otherwise)."""
    bundle_info = steps[-1].artifact.info if steps else {}
    if not steps or steps[-1].kind != "export" or "tasks" in bundle_info:
        return None
    ref_index = reference_index([s.kind for s in steps])
    reference = source if ref_index is None else steps[ref_index].artifact
    model = reference.checkpoint().build(trust)
    metric, reference_val, higher = model_headline(model, data, "val")
    _, reference_test, _ = model_headline(model, data, "test")
    bundle_val = stage_metric(bundle_info, metric)
    if reference_val is None or bundle_val is None:
        return None
    after = steps[(ref_index + 1) if ref_index is not None else 0:]
    test = bundle_info.get(metric)
    return budget_record(
        metric=metric, higher=higher, reference_val=reference_val, reference_test=reference_test,
        bundle_val=bundle_val, bundle_test=float(test) if isinstance(test, (int, float)) else None,
        budget_pt=budget_pt, source=budget_source, enforce=enforce,
        reference_stage="source (--weights)" if ref_index is None else steps[ref_index].id,
        stages=stage_trajectory(after, metric, higher, reference_val))
