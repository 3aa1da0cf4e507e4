"""The build report's accuracy-budget section: the validation figure after every stage against the
budget line (build.json's ``accuracy_budget``, pipeline/accuracy_budget.py), and the budgeted prune's
per-layer sensitivity curves with the levels it tried (the prune stage's ``sensitivity`` info,
pipeline/stages/prune.py). Both were range-checked by ``build_file`` before they get here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .document import Doc, Image, Table, fmt_pct
from .plots import figure, png

IMAGES = ("accuracy_budget", "sensitivity")
MAX_LEGEND_LAYERS = 12  # more layers than this: the curves are drawn, the legend names only the extremes


def accuracy_budget_section(doc: Doc, summary: dict[str, Any]) -> None:
    doc.h2("Accuracy budget")
    record = summary.get("accuracy_budget")
    if not record:
        doc.skipped("accuracy budget", "this build records no accuracy budget (no single-task bundle, or made before "
                    "budgets existed)")
    else:
        _trajectory(doc, record)
    prunes = [s for s in summary["stages"] if (s.get("info") or {}).get("sensitivity")]
    if not prunes:
        doc.skipped("pruning sensitivity", "no prune stage chose its sparsities by the budget (none in the chain, or "
                    "`prune.sparsity` was set)")
        return
    _sensitivity(doc, prunes[-1]["stage"], prunes[-1]["info"]["sensitivity"])


def _trajectory(doc: Doc, record: dict[str, Any]) -> None:
    verdict = "within the budget" if record["met"] else "**over the budget**"
    doc.p(f"Validation {record['metric']}: trained {record['reference']:.4f}, bundle {record['bundle_val']:.4f}, "
          f"drop {record['drop_pt']:+.2f} pt against a budget of {record['budget_pt']:g} pt: {verdict}.")
    rows = [["trained (reference)", f"{record['reference']:.4f}", "+0.00", "-"]]
    classes = [["", "", "", ""]]
    for s in record["stages"]:
        ok = s["drop_pt"] <= record["budget_pt"] + 1e-9
        rows.append([s["stage"], f"{s['val']:.4f}", f"{s['drop_pt']:+.2f}", "ok" if ok else "over"])
        classes.append(["", "", "", "ok" if ok else "bad"])
    doc.table(Table(["after", f"val {record['metric']}", "drop (pt)", "budget"], rows, right={1, 2}, classes=classes))
    try:
        image = plot_budget(record)
    except Exception as e:
        doc.skipped("accuracy budget plot", f"the plot failed ({type(e).__name__}: {e})")
        return
    doc.image(Image("accuracy_budget", "Accuracy after every stage against the budget", image,
                    "Drop of the validation figure against the trained model after each stage, in points, drawn "
                    "downwards (above the dotted line: better than trained). The red line is the budget; the star is "
                    "the bundle, measured in the device runtime."))


def _sensitivity(doc: Doc, stage: str, record: dict[str, Any]) -> None:
    if not record.get("curves"):
        doc.skipped("pruning sensitivity", f"`{stage}` recorded no sensitivity curves")
        return
    levels = record.get("levels") or []
    rows = []
    for t in record.get("trials") or []:
        level = levels[t["level"]] if t["level"] < len(levels) else {}
        shown = ", ".join(f"{k or 'model'} {fmt_pct(v)}" for k, v in (level.get("sparsity") or {}).items()) or "?"
        rows.append([str(t["level"]), shown, f"{t['drop_pt']:+.2f}", "accepted" if t["accepted"] else "rejected"])
    if rows:
        share = record.get("share_pt")
        doc.p(f"`{stage}` searched these levels, each pruned and retrained (masked) on the train split, then judged "
              f"on validation against its share of the budget, {'?' if share is None else f'{share:.2f}'} pt:")
        doc.table(Table(["level", "sparsity per layer", "drop after recovery (pt)", "result"], rows, right={2}))
    try:
        image = plot_sensitivity(record["curves"], record.get("chosen") or {})
    except Exception as e:
        doc.skipped("pruning sensitivity plot", f"the plot failed ({type(e).__name__}: {e})")
        return
    doc.image(Image("sensitivity", "Per-layer pruning sensitivity", image,
                    f"Validation drop when one layer alone is pruned to each sparsity, without retraining "
                    f"(`{stage}`): the ranking that orders the levels above. A filled marker is the sparsity the "
                    f"layer ships with."))


def plot_budget(record: dict[str, Any]) -> bytes:
    names = ["trained"] + [s["stage"] for s in record["stages"]]
    drops = [0.0] + [float(s["drop_pt"]) for s in record["stages"]]
    budget = float(record["budget_pt"])
    fig, ax = figure(max(6.5, 0.9 * len(names) + 2.5), 4.2)
    x = np.arange(len(names))
    ax.plot(x, drops, "-o", color="#1f77b4", zorder=3)
    ax.scatter(x[-1:], drops[-1:], marker="*", s=180, color="#2ca02c" if record["met"] else "#d62728",
               edgecolors="black", linewidths=0.5, zorder=4, label="bundle")
    ax.axhline(budget, color="#d62728", ls="--", lw=1.5, label=f"budget {budget:g} pt")
    ax.axhline(0, color="#7f7f7f", ls=":", lw=1, label="trained model")
    ax.set_xticks(x, [n if len(n) <= 14 else n[:13] + "…" for n in names], fontsize=8,
                  rotation=30 if len(names) > 6 else 0)
    lo, hi = min(drops + [0.0]), max(drops + [budget])
    pad = max(0.1 * (hi - lo), 0.25)
    ax.set_ylim(hi + pad, lo - pad)  # inverted: a loss goes down, towards the budget line
    ax.set_ylabel(f"drop of validation {record['metric']} (pt)")
    ax.set_title(f"Accuracy budget: {record['drop_pt']:+.2f} pt of {budget:g} pt")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return png(fig)


def plot_sensitivity(curves: dict[str, list[dict[str, float]]], chosen: dict[str, float]) -> bytes:
    fig, ax = figure(7.5, 4.6)
    named = len(curves) <= MAX_LEGEND_LAYERS
    for i, (layer, curve) in enumerate(curves.items()):
        xs = [100 * p["sparsity"] for p in curve]
        ys = [p["drop_pt"] for p in curve]
        (line,) = ax.plot(xs, ys, "-o", ms=3, lw=1.2, alpha=0.85, label=(layer or "model") if named else None)
        if layer in chosen:
            at = next((p["drop_pt"] for p in curve if abs(p["sparsity"] - chosen[layer]) < 1e-9), None)
            if at is not None:
                ax.scatter([100 * chosen[layer]], [at], s=70, color=line.get_color(), edgecolors="black", zorder=4)
    ax.set_xlabel("sparsity of the one layer pruned (%)")
    ax.set_ylabel("validation drop without retraining (pt)")
    ax.set_title(f"Per-layer pruning sensitivity ({len(curves)} layers)")
    ax.grid(True, alpha=0.3)
    if named:
        ax.legend(fontsize=7, loc="upper left")
    return png(fig)
