"""The build report's continual-learning section: the forgetting matrix of a multi-task build.

Rows: the model after each ``learn`` stage (torch, fp32, each task's whole test split on its own
output columns), then the shipped bundle (the export stage's per-task accuracy in the device
runtime). Columns: the tasks. Forgetting of a task = its best accuracy in any row minus its
accuracy in the bundle (Chaudhry et al. 2018's "forgetting measure", with the bundle as the end).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .document import Doc, Image, Table, fmt_metric
from .plots import figure, png

IMAGES = ("forgetting",)  # written only for multi-task builds (sections.IMAGES: every build's)


def forgetting_section(doc: Doc, summary: dict, manifest: dict | None) -> None:
    """Multi-task builds (learn stages): accuracy of every task after every task."""
    tasks, rows = forgetting_rows(summary, manifest)
    if not rows:
        return  # not a multi-task build: no section
    doc.h2("Forgetting matrix")
    cells = [[label] + [fmt_metric(r.get(t)) for t in tasks] for label, r in rows]
    doc.table(Table(["after", *tasks], cells, right=set(range(1, len(tasks) + 1))))
    lost = forgetting(tasks, rows)
    if lost:
        doc.p("Forgetting (best accuracy of a task in any row minus its accuracy in the last row): "
              + ", ".join(f"{t} {v:+.4f}" for t, v in lost.items())
              + f"; mean {sum(lost.values()) / len(lost):.4f}.")
    try:
        image = plot_matrix(tasks, rows)
    except Exception as e:
        doc.skipped("forgetting matrix plot", f"the plot failed ({type(e).__name__}: {e})")
        return
    doc.image(Image("forgetting", "Forgetting matrix", image,
                    "Test accuracy of each task (columns, on its own output head) after each learn stage (torch fp32) "
                    "and in the shipped bundle (last row, measured in the device runtime by export)."))


def forgetting_rows(summary: dict[str, Any], manifest: dict[str, Any] | None) -> tuple[list[str], list[tuple[str, dict]]]:
    """``(tasks in order, [(row label, {task: accuracy})])`` from build.json (and the manifest)."""
    learns = [s for s in summary.get("stages", []) if s.get("kind") == "learn" and (s.get("info") or {}).get("task_accuracy")]
    tasks: list[str] = []
    rows = []
    for s in learns:
        info = s["info"]
        for t in info.get("tasks") or info["task_accuracy"]:
            if t not in tasks:
                tasks.append(t)
        rows.append((f"after {s['id']} ({info.get('task')}, {info.get('method')})", dict(info["task_accuracy"])))
    if manifest and manifest.get("tasks"):
        rows.append(("bundle (int8 in its runtime)" if manifest.get("precision") == "int8" else
                     f"bundle ({manifest.get('precision')} in its runtime)",
                     {t["name"]: (t.get("metrics") or {}).get("accuracy") for t in manifest["tasks"]}))
    return tasks, rows


def forgetting(tasks: list[str], rows: list[tuple[str, dict]]) -> dict[str, float]:
    """Best accuracy over the rows minus the last row's, per task that has both (not the last task)."""
    if not rows:
        return {}
    final = rows[-1][1]
    out = {}
    for t in tasks[:-1]:
        seen = [r[t] for _, r in rows if r.get(t) is not None]
        if seen and final.get(t) is not None:
            out[t] = max(seen) - final[t]
    return out


def plot_matrix(tasks: list[str], rows: list[tuple[str, dict]]) -> bytes:
    values = np.array([[np.nan if r.get(t) is None else r[t] for t in tasks] for _, r in rows], dtype=float)
    fig, ax = figure(1.6 + 0.9 * len(tasks), 1.2 + 0.45 * len(rows))
    im = ax.imshow(values, vmin=max(0.0, float(np.nanmin(values)) - 0.05) if np.isfinite(values).any() else 0, vmax=1.0,
                   cmap="viridis", aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] < 0.5 * (1 + np.nanmin(values)) else "black")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(rows)), [label.split(" (")[0] for label, _ in rows], fontsize=8)
    ax.set_xlabel("task (test accuracy on its own head)")
    ax.set_title("Forgetting matrix", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return png(fig)
