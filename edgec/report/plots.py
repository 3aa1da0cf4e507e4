"""The build report's plots, as PNG bytes: accuracy against bytes, per-layer sparsity, weights before
and after sharing, the confusion matrix and the latency distribution; and :func:`figure` / :func:`png`,
which every plot of the report (these and the per-task sections') is drawn on and saved with.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import io

import numpy as np

from .document import fmt_ms

DPI = 110


def figure(w: float, h: float, grid: tuple[int, int] | None = None, **subplots):
    """``(figure, axes)``: a ``w`` x ``h`` inch figure with one axes, or ``fig.subplots(*grid, **subplots)``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    return fig, (fig.add_subplot() if grid is None else fig.subplots(*grid, **subplots))


def png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def plot_pareto(points: list[tuple[str, float, float, str]]) -> bytes:
    fig, ax = figure(7.5, 4.6)
    markers = {"fp32 bytes": ("o", "#1f77b4"), "Deep Compression estimate": ("s", "#2ca02c"),
               "bundle transport bytes": ("*", "#d62728")}
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    ax.plot(xs, ys, ":", color="#999999", lw=1, zorder=1)
    for which, (marker, color) in markers.items():
        sel = [p for p in points if p[3] == which]
        if sel:
            ax.scatter([p[1] for p in sel], [p[2] for p in sel], marker=marker, s=150 if marker == "*" else 60,
                       color=color, label=which, zorder=3, edgecolors="black", linewidths=0.5)
    frontier = _pareto_front(points)
    if len(frontier) > 1:
        ax.step([p[1] for p in frontier], [p[2] for p in frontier], where="post", color="#ff7f0e", lw=1.5,
                alpha=0.8, label="Pareto front", zorder=2)
    for i, (name, x, y, _) in enumerate(points):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -12), fontsize=9)
    ax.set_xscale("log")
    lo, hi = min(xs), max(xs)
    ax.set_xlim(lo / 1.6, hi * 1.6)
    span = max(ys) - min(ys)
    pad = max(span * 0.15, 0.005)
    ax.set_ylim(min(ys) - pad, min(1.0 + pad / 2, max(ys) + pad))
    ax.set_xlabel("bytes (log scale): Deep Compression estimate / fp32 for models, transport for the bundle")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy against bytes per stage")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return png(fig)


def _pareto_front(points: list[tuple[str, float, float, str]]) -> list[tuple[str, float, float, str]]:
    """Points no other point beats on both size (smaller) and accuracy (higher), by size."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p[1], -p[2])):
        if p[2] > best:
            front.append(p)
            best = p[2]
    return front


def plot_sparsity(stages: list[dict]) -> bytes:
    layers: list[str] = []
    sizes: dict[str, int] = {}
    for s in stages:
        for r in s["info"]["sparsity"]["layers"]:
            if r["layer"] not in sizes:
                layers.append(r["layer"])
                sizes[r["layer"]] = r["params"]
    fig, ax = figure(max(6.5, 1.4 * len(layers) + 2.5), 4.4)
    n = len(stages)
    width = 0.8 / n
    x = np.arange(len(layers))
    for i, s in enumerate(stages):
        by_layer = {r["layer"]: r["sparsity"] for r in s["info"]["sparsity"]["layers"]}
        vals = [100 * by_layer.get(name, np.nan) for name in layers]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=s["stage"])
        if i == n - 1:
            ax.bar_label(bars, labels=[f"{v:.0f}%" if v == v else "" for v in vals], fontsize=8, padding=2)
    ax.set_xticks(x, [f"{name}\n{sizes[name]:,} weights" for name in layers], fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("sparsity (% of weights zero)")
    ax.set_xlabel("layer")
    ax.set_title("Per-layer sparsity")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncols=min(n, 4))
    return png(fig)


def plot_sharing(layer: str, before: np.ndarray, after: np.ndarray, centroids: np.ndarray, b_name: str, a_name: str) -> bytes:
    fig, (ax1, ax2) = figure(7.5, 5.2, (2, 1), sharex=True)
    everything = np.concatenate([before, after, centroids]) if before.size + after.size else centroids
    lo, hi = float(everything.min()), float(everything.max())
    bins = np.linspace(lo, hi, 81) if hi > lo else 40
    ax1.hist(before, bins=bins, color="#1f77b4", alpha=0.8)
    ax1.set_title(f"before sharing (after {b_name}): {before.size:,} non-zero weights, "
                  f"{np.unique(before).size:,} distinct values", fontsize=10)
    # after sharing every weight is a centroid: a bar per centroid shows how many weights use it
    values, counts = np.unique(after, return_counts=True)
    step = (hi - lo) / 160 if hi > lo else 0.01
    ax2.bar(values, counts, width=step, color="#2ca02c")
    ax2.set_title(f"after sharing (after {a_name}): {after.size:,} non-zero weights, "
                  f"{values.size:,} distinct values", fontsize=10)
    for ax in (ax1, ax2):
        for c in centroids:
            ax.axvline(float(c), color="#d62728", lw=0.6, alpha=0.6)
        ax.set_ylabel("weights")
        ax.grid(True, axis="y", alpha=0.3)
    ax2.set_xlabel("weight value (red lines: centroids)")
    fig.suptitle(f"{layer}: weight histogram before and after sharing ({len(centroids)} centroids)")
    return png(fig)


def plot_confusion(cm: np.ndarray, labels: list[str], acc: float, what: str) -> bytes:
    n = len(labels)
    side = min(8.0, max(4.6, 0.4 * n + 2.0))
    fig, ax = figure(side + 0.8, side)
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="samples")
    if n <= 25:
        thresh = cm.max() / 2 if cm.max() else 1
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if cm[i, j] > thresh else "black")
    ticks = np.arange(n)
    short = [lab if len(lab) <= 10 else lab[:9] + "…" for lab in labels]
    ax.set_xticks(ticks, short, rotation=45 if max(map(len, short)) > 2 else 0, fontsize=8)
    ax.set_yticks(ticks, short, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix: {what}\naccuracy {acc:.4f} on {int(cm.sum()):,} eval samples", fontsize=10)
    return png(fig)


def plot_latency_profile(bench: dict, budget: float | None, where: str) -> bytes:
    fig, ax = figure(8.5, 4.6)
    keys = ["min", "p50", "p90", "p95", "p99", "max"]
    x = np.arange(len(keys))
    best_id = (bench.get("best") or {}).get("id")
    settings = [s for s in bench.get("settings") or [] if s.get("ok") and s.get("latency_ms")]
    if not settings:
        settings = [{"id": best_id or "best", "latency_ms": bench["latency_ms"]}]
    values = []
    for s in settings:
        ys = [s["latency_ms"].get(k) for k in keys]
        ys = [np.nan if v is None else float(v) for v in ys]
        values += [v for v in ys if v == v and v > 0]
        best = s.get("id") == best_id
        ax.plot(x, ys, marker="o", lw=2.8 if best else 1.2, alpha=1.0 if best else 0.7,
                label=f"{s.get('id')} (best)" if best else s.get("id"), zorder=3 if best else 2)
    ax.axvspan(2.65, 3.35, color="#d62728", alpha=0.07, lw=0)  # the p95 column the budget applies to
    _budget_line(ax, budget, horizontal=True)
    if values:
        allv = values + ([budget] if budget else [])
        if _log_if_wide(ax, allv, axis="y"):
            ax.set_ylim(min(allv) / 1.5, max(allv) * 2.0)
        else:
            ax.set_ylim(0, max(allv) * 1.15)
    ax.set_xticks(x, keys)
    ax.set_xlabel("percentile of timed runs")
    ax.set_ylabel("latency per inference (ms)")
    ax.set_title(f"Latency at batch 1 (percentile profile)\n{where}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="setting", title_fontsize=7)
    return png(fig)


def plot_latency_samples(samples: np.ndarray, budget: float | None, where: str) -> bytes:
    fig, ax = figure(7.5, 4.6)
    pos = samples[samples > 0]
    wide = pos.size and pos.max() / pos.min() > 20
    bins = np.geomspace(pos.min(), pos.max(), 60) if wide else 60
    ax.hist(samples, bins=bins, color="#1f77b4", alpha=0.85)
    if wide:
        ax.set_xscale("log")
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        v = float(np.percentile(samples, q))
        ax.axvline(v, color="black", ls=style, lw=1, label=f"p{q} {fmt_ms(v)}")
    if budget and pos.size and budget > pos.max() * 3:  # drawing it would squash the histogram to a line
        p95 = float(np.percentile(samples, 95))
        ax.text(0.98, 0.97, f"p95 budget {budget:g} ms: off this scale\n(p95 {fmt_ms(p95)} is {budget / p95:,.0f}x under it)",
                transform=ax.transAxes, ha="right", va="top", fontsize=8, color="#d62728",
                bbox={"facecolor": "white", "edgecolor": "#d62728", "alpha": 0.9})
    else:
        _budget_line(ax, budget, horizontal=False)
    ax.set_xlabel("latency per inference (ms)")
    ax.set_ylabel("runs")
    ax.set_title(f"Latency at batch 1: {samples.size:,} runs\n{where}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    return png(fig)


def plot_ops(ops: list[dict], top: int = 20) -> bytes:
    """Horizontal bars of the ``top`` heaviest operators of an ``edgec bench --ops`` profile."""
    rows = sorted(ops, key=lambda o: -float(o.get("mean_us") or 0))[:top][::-1]
    fig, ax = figure(8.0, 0.9 + 0.28 * len(rows))
    labels = [f"#{o.get('index')} {o.get('type')} {o.get('name', '')}"[:48] for o in rows]
    colors = ["#7f7f7f" if o.get("delegated") is False else "#1f77b4" for o in rows]
    ax.barh(np.arange(len(rows)), [float(o.get("mean_us") or 0) for o in rows], color=colors)
    ax.set_yticks(np.arange(len(rows)), labels, fontsize=7)
    ax.set_xlabel("mean time per call (us)")
    ax.set_title("Time per operator (heaviest first)", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    return png(fig)


def _budget_line(ax, budget: float | None, horizontal: bool) -> None:
    if not budget:
        return
    if horizontal:
        ax.axhline(budget, color="#d62728", ls="--", lw=1.5, label=f"p95 budget {budget:g} ms")
    else:
        ax.axvline(budget, color="#d62728", ls="--", lw=1.5, label=f"p95 budget {budget:g} ms")


def _log_if_wide(ax, values: list[float], axis: str) -> bool:
    pos = [v for v in values if v and v > 0]
    if pos and max(pos) / min(pos) > 20:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        return True
    return False
