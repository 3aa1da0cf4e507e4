"""``edgec report BUILD_DIR``: what each stage of a build bought and cost, as HTML and Markdown.

Writes into the build directory (``<out>/<target>/``):

- ``report.html``: one self-contained page (CSS inline, plots embedded as base64 PNG, no external
  references), so it opens offline and can be mailed or attached to a CI run;
- ``report.md``: the same content in Markdown, with the plots as PNG files in ``report/``.

Content: the stage table (accuracy, parameters, non-zeros, sparsity, distinct values, fp32 / packed /
model / transport bytes, time, cached or ran), the target's budgets and whether each holds, and the
plots: accuracy against bytes for every stage (log x; which byte count each point is labelled), per-
layer sparsity, one layer's weight histogram before and after sharing with the centroids marked (read
from the stage cache; skipped with a note when the cache no longer has those checkpoints), the
confusion matrix of the shipped bundle on its eval set, and the latency distribution from a bench
result (``BUILD_DIR/bench.json`` or ``bench=``) when there is one. Whatever cannot be drawn is
skipped with a note saying why; only an unreadable build directory (or a bad ``bench=`` file) raises.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import InputError

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
ASSETS_DIR = "report"
BENCH_FILE = "bench.json"
BUILD_FILE = "build.json"
BUNDLE_DIR = "bundle"
CHECKPOINT_FILE = "model.pt"
# Image names this module writes into report/ (older copies not rewritten this time are removed).
IMAGES = ("accuracy_vs_bytes", "sparsity", "weight_sharing", "confusion", "latency")
DPI = 110
MAX_CENTROIDS_SHOWN = 64  # prefer a layer whose codebook is small enough to see each centroid


# --- the document: a list of blocks rendered twice (HTML and Markdown) ---------------------------


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)  # right-aligned (numeric) columns
    classes: list[list[str]] | None = None  # per-cell CSS class (HTML only), e.g. "ok" / "bad"


@dataclass
class Image:
    name: str
    title: str
    png: bytes
    caption: str


@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def image(self, image: Image) -> None:
        self.blocks.append(("image", image))

    def skipped(self, what: str, why: str) -> None:
        """A plot or section that could not be made: said where it would be and listed at the end."""
        self.blocks.append(("note", f"{what}: skipped, {why}"))
        self.notes.append(f"{what}: {why}")


# --- entry point --------------------------------------------------------------------------------


def write_report(build_dir: Path, bench: Path | None = None) -> dict[str, Path]:
    """Write ``report.html``, ``report.md`` and ``report/*.png`` into ``build_dir``.

    ``bench``: an ``edgec bench --json`` result; default ``build_dir/bench.json`` when present.
    Returns ``{"html": ..., "markdown": ..., "assets": ..., <image name>: png path, ...}``.
    Raises InputError when ``build_dir`` has no readable build.json or ``bench`` is not a bench result.
    """
    build_dir = Path(build_dir)
    summary = _read_build(build_dir)
    bench_data, bench_note = _read_bench(build_dir, bench)
    bundle_dir = build_dir / BUNDLE_DIR
    manifest = _read_manifest(bundle_dir)
    doc = Doc()
    if bench_note:
        doc.notes.append(bench_note)

    _header(doc, build_dir, summary, manifest, bench_data)
    _stage_section(doc, summary)
    _budget_section(doc, manifest, bench_data)
    _pareto_section(doc, summary)
    _sparsity_section(doc, summary)
    _sharing_section(doc, summary)
    _forgetting_section(doc, summary, manifest)
    _confusion_section(doc, bundle_dir, manifest)
    _latency_section(doc, bench_data, manifest, build_dir)
    return _write(doc, build_dir, title=f"edgec build report: {summary.get('target', build_dir.name)}")


# --- inputs -------------------------------------------------------------------------------------


def _read_build(build_dir: Path) -> dict[str, Any]:
    path = build_dir / BUILD_FILE
    if not path.is_file():
        raise InputError(f"{build_dir} is not an edgec build directory (no {BUILD_FILE}); "
                         "pass <out>/<target>/ written by `edgec build`")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable JSON file ({e}); rebuild with `edgec build`") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("stages"), list):
        raise InputError(f"{path} has no stage list; rebuild with `edgec build`")
    return summary


def _read_bench(build_dir: Path, bench: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    from edgec.benchmarking import load_bench_json

    if bench is not None:
        return load_bench_json(Path(bench)), None  # asked for by name: a bad file is an error
    default = build_dir / BENCH_FILE
    if not default.is_file():
        return None, None
    try:
        return load_bench_json(default), None
    except InputError as e:
        return None, f"{BENCH_FILE} ignored: {e}"


def _read_manifest(bundle_dir: Path) -> dict[str, Any] | None:
    path = bundle_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _model_stages(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Stages whose artifact is a model (everything but export / a bundle)."""
    return [s for s in summary["stages"] if "transport_bytes" not in (s.get("info") or {})]


def _bundle_stage(summary: dict[str, Any]) -> dict[str, Any] | None:
    for s in summary["stages"]:
        if "transport_bytes" in (s.get("info") or {}):
            return s
    return None


def _cache_dir(summary: dict[str, Any]) -> Path | None:
    cache = (summary.get("config") or {}).get("cache_dir")
    return Path(cache).expanduser() if cache else None


def _checkpoint_path(summary: dict[str, Any], stage: dict[str, Any]) -> Path | None:
    cache = _cache_dir(summary)
    if cache is None or not stage.get("key"):
        return None
    path = cache / stage.get("kind", stage["stage"]) / stage["key"] / CHECKPOINT_FILE
    return path if path.is_file() else None


# --- formatting ---------------------------------------------------------------------------------


def _int(v: Any) -> str:
    return "-" if v is None else f"{int(v):,}"


def _acc(v: Any) -> str:
    return "-" if v is None else f"{float(v):.4f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def _bytes(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    if v < 1024:
        return f"{int(v)} B"
    for unit in ("KiB", "MiB", "GiB"):
        v /= 1024
        if v < 1024 or unit == "GiB":
            return f"{v:.1f} {unit}"
    return "-"


def _ms(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v * 1000:.2f} us" if v < 0.1 else f"{v:.3f} ms"


def _sparsity(info: dict[str, Any]) -> float | None:
    """Of the prunable weights when the stage reports it, else of all parameters."""
    total = (info.get("sparsity") or {}).get("total") or {}
    if total.get("sparsity") is not None:
        return float(total["sparsity"])
    if info.get("params") and info.get("nonzero_params") is not None:
        return 1 - info["nonzero_params"] / info["params"]
    return None


def _size_for_plot(info: dict[str, Any]) -> tuple[float | None, str]:
    """(bytes, which) for the accuracy-vs-bytes plot."""
    if info.get("transport_bytes") is not None:
        return float(info["transport_bytes"]), "bundle transport bytes"
    if info.get("packed_weights_bytes") is not None:
        return float(info["packed_weights_bytes"]), "packed weights bytes"
    if info.get("fp32_bytes") is not None:
        return float(info["fp32_bytes"]), "fp32 bytes"
    return None, ""


# --- sections -----------------------------------------------------------------------------------


def _header(doc: Doc, build_dir: Path, summary: dict, manifest: dict | None, bench: dict | None) -> None:
    config = summary.get("config") or {}
    model = (config.get("model") or {}).get("name") or (config.get("model") or {}).get("weights") or "-"
    facts = [
        f"target **{summary.get('target', '-')}**",
        f"model {model}",
        f"data {summary.get('data', '-')}",
        f"seed {summary.get('seed', '-')}",
    ]
    doc.p(" · ".join(facts))
    doc.p(f"Build directory `{build_dir.resolve()}`; report written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.")
    export = _bundle_stage(summary)
    models = _model_stages(summary)
    if export and models:
        info = export["info"]
        first = next((s for s in models if s["info"].get("fp32_bytes")), None)
        ratio = ""
        if first and info.get("transport_bytes"):
            ratio = (f", {first['info']['fp32_bytes'] / info['transport_bytes']:.1f}x smaller than the fp32 "
                     f"`{first['stage']}` model ({_int(first['info']['fp32_bytes'])} bytes)")
        doc.p(
            f"Shipped: `{(manifest or {}).get('model_file', 'bundle')}` ({info.get('precision', '?')}), accuracy "
            f"{_acc(info.get('accuracy'))} (the model it was exported from: {_acc(info.get('reference_accuracy'))}; "
            f"top-1 agreement {_acc(info.get('top1_agreement'))}), transport {_int(info.get('transport_bytes'))} "
            f"bytes{ratio}."
        )
    elif not export:
        doc.p("This build's chain does not end in export: there is no bundle (no budgets, confusion matrix or latency).")


def _stage_section(doc: Doc, summary: dict) -> None:
    doc.h2("Stages")
    headers = ["stage", "status", "accuracy", "Δ accuracy", "params", "non-zeros", "sparsity",
               "distinct values (max/layer)", "fp32 bytes", "packed bytes", "model bytes", "transport bytes", "time (s)"]
    rows = []
    src = summary.get("source") or {}
    entries = [("source", "-", src, None)] + [
        (s["stage"], "cached" if s.get("cached") else "ran", s.get("info") or {}, s.get("seconds")) for s in summary["stages"]
    ]
    prev_acc = None
    for name, status, info, seconds in entries:
        acc = info.get("accuracy")
        delta = "-" if acc is None or prev_acc is None else f"{acc - prev_acc:+.4f}"
        distinct = info.get("distinct_values") or {}
        rows.append([
            name, status, _acc(acc), delta, _int(info.get("params")), _int(info.get("nonzero_params")),
            _pct(_sparsity(info)), _int(max(distinct.values())) if distinct else "-", _int(info.get("fp32_bytes")),
            _int(info.get("packed_weights_bytes")), _int(info.get("model_bytes")), _int(info.get("transport_bytes")),
            "-" if seconds is None else f"{seconds:.1f}",
        ])
        if acc is not None:
            prev_acc = acc
    total = sum(s.get("seconds") or 0 for s in summary["stages"])
    ran = sum(not s.get("cached") for s in summary["stages"])
    rows.append(["total", f"{ran} ran"] + [""] * 10 + [f"{total:.1f}"])
    doc.table(Table(headers, rows, right=set(range(2, len(headers)))))
    doc.p(
        "Δ accuracy: against the row above (test split). Sparsity: of the prunable (conv / linear) weights where "
        "the stage reports it, else of all parameters. Packed bytes: the compressed torch weights "
        "(`packed_weights_bytes`, stages that prune or share). Model / transport bytes: the exported model file "
        "and what is sent to the device (compressed)."
    )


def _budget_section(doc: Doc, manifest: dict | None, bench: dict | None) -> None:
    from edgec.budgets import check_budgets
    from edgec.targets.profile import Budgets

    doc.h2("Budgets")
    if manifest is None:
        doc.skipped("budgets", "no bundle in this build")
        return
    try:
        budgets = Budgets.model_validate(((manifest.get("target") or {}).get("profile") or {}).get("budgets") or {})
        rows = check_budgets(manifest, budgets, bench)
    except Exception as e:  # a manifest from another version: say so, keep the rest of the report
        doc.skipped("budgets", f"the manifest's budgets could not be read ({type(e).__name__}: {e})")
        return
    table_rows, classes = [], []
    for r in rows:
        if r["ok"] is None:
            verdict, cls = ("unknown (no bench result)" if r["budget"] == "max_p95_ms" else "unknown"), "unknown"
        else:
            verdict, cls = ("ok", "ok") if r["ok"] else ("VIOLATED", "bad")
        if r.get("p50_ms"):  # min_speedup: both latencies of `edgec bench --baseline`
            verdict += f" (p50 {_ms(r['p50_ms']['bundle'])} vs uncompressed {_ms(r['p50_ms']['uncompressed'])})"
        table_rows.append([r["budget"], f"{r['op']} {_budget_value(r['budget'], r['limit'])}",
                           _budget_value(r["budget"], r["actual"]), verdict])
        classes.append(["", "", "", cls])
    doc.table(Table(["budget", "limit", "actual", "result"], table_rows, right={1, 2}, classes=classes))
    violated = [r["budget"] for r in rows if r["ok"] is False]
    unknown = [r["budget"] for r in rows if r["ok"] is None]
    verdict = f"**{len(violated)} violated**: {', '.join(violated)}" if violated else "all checked budgets hold"
    doc.p(f"Target `{(manifest.get('target') or {}).get('name', '?')}`: {verdict}"
          + (f"; not checked: {', '.join(unknown)}." if unknown else ".")
          + " Same rules as `edgec check`.")
    if bench is not None:
        machine = bench.get("machine") or "?"
        arch = ((manifest.get("target") or {}).get("profile") or {}).get("arch") or "any"
        same = arch == "any" or _same_arch(machine, arch)
        doc.p(f"The p95 latency is from the bench result ({machine}, {bench.get('created_utc', '?')})"
              + ("." if same else f", not from the target's {arch} device: run `edgec bench` on the device for the "
                                  f"figure that counts."))


_ARCH_ALIASES = {"arm64": {"arm64", "aarch64"}, "aarch64": {"arm64", "aarch64"},
                 "x86_64": {"x86_64", "amd64"}, "amd64": {"x86_64", "amd64"}}


def _same_arch(machine: str, arch: str) -> bool:
    return machine.lower() in _ARCH_ALIASES.get(arch.lower(), {arch.lower()})


def _budget_value(name: str, v: Any) -> str:
    if v is None:
        return "-"
    if name.endswith("_bytes"):
        return f"{int(v):,}"
    if name.endswith("_ms"):
        return f"{float(v):.4g} ms"
    if name == "min_speedup":
        return f"{float(v):.2f}x"
    return f"{float(v):.4f}"


def _pareto_section(doc: Doc, summary: dict) -> None:
    doc.h2("Accuracy against size")
    points = []
    for s in summary["stages"]:
        info = s.get("info") or {}
        size, which = _size_for_plot(info)
        if size and info.get("accuracy") is not None:
            points.append((s["stage"], size, float(info["accuracy"]), which))
    if not points:
        doc.skipped("accuracy against size", "no stage recorded both accuracy and a size")
        return
    try:
        png = _plot_pareto(points)
    except Exception as e:
        doc.skipped("accuracy against size", f"the plot failed ({type(e).__name__}: {e})")
        return
    doc.image(Image(
        "accuracy_vs_bytes", "Accuracy against bytes, every stage", png,
        "Test accuracy of every stage's model against its size on a log axis. Model stages count "
        "`packed_weights_bytes` when they record it (square) else their dense fp32 bytes (circle); the bundle "
        "counts its transport bytes (star). The solid line joins the Pareto-optimal points (no other point is "
        "both smaller and more accurate); the dotted line is the build order.",
    ))


def _plot_pareto(points: list[tuple[str, float, float, str]]) -> bytes:
    fig, ax = _figure(7.5, 4.6)
    markers = {"fp32 bytes": ("o", "#1f77b4"), "packed weights bytes": ("s", "#2ca02c"),
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
    ax.set_xlabel("bytes (log scale): packed weights / fp32 for models, transport for the bundle")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy against bytes per stage")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _pareto_front(points: list[tuple[str, float, float, str]]) -> list[tuple[str, float, float, str]]:
    """Points no other point beats on both size (smaller) and accuracy (higher), by size."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p[1], -p[2])):
        if p[2] > best:
            front.append(p)
            best = p[2]
    return front


def _forgetting_section(doc: Doc, summary: dict, manifest: dict | None) -> None:
    """Multi-task builds (learn stages): accuracy of every task after every task (report_continual.py)."""
    from .report_continual import forgetting, forgetting_rows, plot_matrix

    tasks, rows = forgetting_rows(summary, manifest)
    if not rows:
        return  # not a multi-task build: no section
    doc.h2("Forgetting matrix")
    cells = [[label] + [_acc(r.get(t)) for t in tasks] for label, r in rows]
    doc.table(Table(["after", *tasks], cells, right=set(range(1, len(tasks) + 1))))
    lost = forgetting(tasks, rows)
    if lost:
        doc.p("Forgetting (best accuracy of a task in any row minus its accuracy in the last row): "
              + ", ".join(f"{t} {v:+.4f}" for t, v in lost.items())
              + f"; mean {sum(lost.values()) / len(lost):.4f}.")
    try:
        png = plot_matrix(tasks, rows, _figure, _png)
    except Exception as e:
        doc.skipped("forgetting matrix plot", f"the plot failed ({type(e).__name__}: {e})")
        return
    doc.image(Image("forgetting", "Forgetting matrix", png,
                    "Test accuracy of each task (columns, on its own output head) after each learn stage (torch fp32) "
                    "and in the shipped bundle (last row, measured in the device runtime by export)."))


def _sparsity_section(doc: Doc, summary: dict) -> None:
    doc.h2("Sparsity per layer")
    stages = [s for s in summary["stages"] if ((s.get("info") or {}).get("sparsity") or {}).get("layers")]
    if not stages:
        doc.skipped("per-layer sparsity", "no stage in this build reports per-layer sparsity (no prune / share stage)")
        return
    try:
        png = _plot_sparsity(stages)
    except Exception as e:
        doc.skipped("per-layer sparsity", f"the plot failed ({type(e).__name__}: {e})")
        return
    doc.image(Image("sparsity", "Per-layer sparsity", png,
                    "Share of each prunable layer's weights that are zero (or masked), per stage that reports it; "
                    "the label under each layer is its weight count."))
    last = stages[-1]
    distinct = last["info"].get("distinct_values") or {}
    rows = [[r["layer"], _int(r["params"]), _int(r["nonzero"]), _pct(r["sparsity"]), _int(distinct.get(r["layer"]))]
            for r in last["info"]["sparsity"]["layers"]]
    doc.p(f"Layers after `{last['stage']}`, the last stage that reports them:")
    doc.table(Table(["layer", "weights", "non-zeros", "sparsity", "distinct values"], rows, right={1, 2, 3, 4}))


def _plot_sparsity(stages: list[dict]) -> bytes:
    layers: list[str] = []
    sizes: dict[str, int] = {}
    for s in stages:
        for r in s["info"]["sparsity"]["layers"]:
            if r["layer"] not in sizes:
                layers.append(r["layer"])
                sizes[r["layer"]] = r["params"]
    fig, ax = _figure(max(6.5, 1.4 * len(layers) + 2.5), 4.4)
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
    return _png(fig)


def _sharing_section(doc: Doc, summary: dict) -> None:
    doc.h2("Weight sharing")
    stages = summary["stages"]
    idx = next((i for i, s in enumerate(stages) if s.get("kind", s["stage"]) == "share"), None)
    what = "weight histogram before and after sharing"
    if idx is None:
        doc.skipped(what, "no share stage in this build")
        return
    if idx == 0:
        doc.skipped(what, "share is the first stage, so the model before it (the source) has no recorded cache key")
        return
    before_stage, after_stage = stages[idx - 1], stages[idx]
    paths = [_checkpoint_path(summary, before_stage), _checkpoint_path(summary, after_stage)]
    if None in paths:
        missing = [s["stage"] for s, p in zip((before_stage, after_stage), paths) if p is None]
        doc.skipped(what, f"the checkpoint(s) of {', '.join(missing)} are no longer in the stage cache "
                          f"({_cache_dir(summary)}); rebuild to bring them back")
        return
    try:
        from edgec.checkpoint import load_checkpoint

        before, after = load_checkpoint(paths[0]), load_checkpoint(paths[1])
        layer = _pick_shared_layer(after)
        if layer is None:
            doc.skipped(what, f"the {after_stage['stage']} checkpoint has no codebooks")
            return
        w_before = _kept_weights(before, layer)
        w_after = _kept_weights(after, layer)
        centroids = after.codebooks[layer].detach().float().cpu().numpy().ravel()
        png = _plot_sharing(layer, w_before, w_after, centroids, before_stage["stage"], after_stage["stage"])
    except Exception as e:
        doc.skipped(what, f"the checkpoints could not be read ({type(e).__name__}: {e})")
        return
    doc.image(Image(
        "weight_sharing", f"Weights of {layer} before and after sharing", png,
        f"Non-zero weights of `{layer}` after `{before_stage['stage']}` (top) and after `{after_stage['stage']}` "
        f"(bottom); the red lines are the {len(centroids)} shared values (centroids). Pruned zeros are left out.",
    ))
    books = {name: int(cb.numel()) for name, cb in after.codebooks.items()}
    doc.p("Codebook sizes: " + ", ".join(f"`{k}` {v}" for k, v in books.items()) + ".")


def _pick_shared_layer(ckpt) -> str | None:
    """The layer with the most weights among those with a small enough codebook to see (else the largest)."""
    books = {name: cb for name, cb in ckpt.codebooks.items() if name in ckpt.state_dict}
    if not books:
        return None
    small = [n for n, cb in books.items() if cb.numel() <= MAX_CENTROIDS_SHOWN] or list(books)
    return max(small, key=lambda n: ckpt.state_dict[n].numel())


def _kept_weights(ckpt, layer: str) -> np.ndarray:
    w = ckpt.state_dict[layer].detach().float().cpu()
    keep = w != 0
    if layer in ckpt.masks:
        keep &= ckpt.masks[layer].bool()
    return w[keep].numpy().ravel()


def _plot_sharing(layer: str, before: np.ndarray, after: np.ndarray, centroids: np.ndarray, b_name: str, a_name: str) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.2), dpi=DPI, layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
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
    return _png(fig)


def _confusion_section(doc: Doc, bundle_dir: Path, manifest: dict | None) -> None:
    if (manifest or {}).get("task", "classification") != "classification":  # regression / reconstruction
        from .report_tasks import task_section

        return task_section(doc, bundle_dir, manifest)
    doc.h2("Confusion matrix of the shipped bundle")
    what = "confusion matrix"
    if manifest is None:
        doc.skipped(what, "no bundle in this build")
        return
    try:
        from edgec.ondevice import load_bundle

        bundle = load_bundle(str(bundle_dir))
        ev = bundle.eval_set()
        if ev is None:
            doc.skipped(what, "the bundle has no eval.npz")
            return
        x, y = ev
        model = bundle.open_model()
        try:
            pred = np.asarray(model.predict_raw(x)).reshape(len(x), -1).argmax(axis=1)
        finally:
            model.close()
        labels = bundle.labels()
        runtime = model.runtime.as_dict()
    except Exception as e:  # a missing runtime on this machine, a corrupt file: report, don't fail
        doc.skipped(what, f"the bundle's model could not be run here ({type(e).__name__}: {' '.join(str(e).split())[:300]})")
        return
    n = max(int(y.max(initial=-1)) + 1, int(pred.max(initial=-1)) + 1, len(labels))
    labels = (labels + [str(i) for i in range(len(labels), n)])[:n]
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    acc = float(np.trace(cm) / max(1, cm.sum()))
    try:
        png = _plot_confusion(cm, labels, acc, f"{bundle.model_file} via {runtime.get('package')} {runtime.get('version')}")
    except Exception as e:
        doc.skipped(what, f"the plot failed ({type(e).__name__}: {e})")
        return
    recorded = (manifest.get("metrics") or {}).get("accuracy")
    doc.image(Image(
        "confusion", "Confusion matrix of the shipped bundle", png,
        f"`{bundle.model_file}` run on this machine on the bundle's eval set ({len(y):,} samples): accuracy "
        f"{acc:.4f} (manifest: {_acc(recorded)}). Rows: true class; columns: predicted class.",
    ))
    worst = sorted(((cm[i, j], labels[i], labels[j]) for i in range(n) for j in range(n) if i != j and cm[i, j]),
                   reverse=True)[:3]
    if worst:
        doc.p("Most frequent confusions: " + ", ".join(f"{t} → {p} ({c}x)" for c, t, p in worst) + ".")


def _plot_confusion(cm: np.ndarray, labels: list[str], acc: float, what: str) -> bytes:
    n = len(labels)
    side = min(8.0, max(4.6, 0.4 * n + 2.0))
    fig, ax = _figure(side + 0.8, side)
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
    return _png(fig)


def _latency_samples(bench: dict) -> np.ndarray | None:
    """Per-run latencies in ms when the bench result carries them (newer harnesses may)."""
    best_id = (bench.get("best") or {}).get("id")
    best = next((s for s in bench.get("settings") or [] if s.get("id") == best_id), {})
    for holder in (bench.get("latency_ms"), bench, best.get("latency_ms") if isinstance(best, dict) else None, best):
        if not isinstance(holder, dict):
            continue
        for key in ("samples", "samples_ms", "latency_samples_ms", "runs_ms"):
            v = holder.get(key)
            if isinstance(v, list) and len(v) > 1 and all(isinstance(t, (int, float)) for t in v[:100]):
                return np.asarray(v, dtype=np.float64)
    return None


def _latency_section(doc: Doc, bench: dict | None, manifest: dict | None, build_dir: Path) -> None:
    doc.h2("Latency")
    if bench is None:
        doc.skipped("latency distribution",
                    f"no bench result; run `edgec bench {build_dir / BUNDLE_DIR} --json {build_dir / BENCH_FILE}` "
                    f"then `edgec report {build_dir}`")
        return
    if not bench.get("ok") or not bench.get("latency_ms"):
        doc.skipped("latency distribution", "the bench result has no successful measurement: "
                    + "; ".join(bench.get("errors") or ["no errors recorded"])[:300])
        return
    man_size = (manifest or {}).get("size") or {}
    bench_size = bench.get("size") or {}
    if man_size.get("model_bytes") and bench_size.get("model_bytes") and man_size["model_bytes"] != bench_size["model_bytes"]:
        doc.notes.append(f"the bench result measured a {bench_size['model_bytes']:,}-byte model but this bundle's is "
                         f"{man_size['model_bytes']:,} bytes: it is probably from another build")
        doc.p(f"**Warning**: {doc.notes[-1]}.")
    budget = ((((manifest or {}).get("target") or {}).get("profile") or {}).get("budgets") or {}).get("max_p95_ms")
    samples = _latency_samples(bench)
    runtime = bench.get("runtime") or {}
    where = f"{bench.get('machine', '?')}, {runtime.get('package', '?')} {runtime.get('version', '')}".strip()
    try:
        png = _plot_latency_samples(samples, bench, budget, where) if samples is not None else \
            _plot_latency_profile(bench, budget, where)
    except Exception as e:
        doc.skipped("latency distribution", f"the plot failed ({type(e).__name__}: {e})")
        return
    lat = bench["latency_ms"]
    kind = (f"histogram of {samples.size:,} per-run latencies" if samples is not None else
            "percentile profile (min, p50, p90, p95, p99, max) of every runtime setting measured; the thick line "
            "is the setting the bench picked")
    off_scale = " (or a note in the corner when it is far off the scale)" if samples is not None else ""
    doc.image(Image(
        "latency", "Latency at batch 1", png,
        f"From the bench result of {bench.get('created_utc', '?')} on {where}: {kind}. The target's p95 budget is the "
        f"dashed red line{off_scale}. Best setting `{(bench.get('best') or {}).get('id', '?')}`: p50 {_ms(lat.get('p50'))}, "
        f"p95 {_ms(lat.get('p95'))}, p99 {_ms(lat.get('p99'))} over {_int(lat.get('runs'))} runs.",
    ))
    base = bench.get("baseline") or {}
    if base.get("speedup_p50"):
        doc.p(f"Uncompressed model (`uncompressed.pt`, exported {base.get('precision', '?')} for this target, same harness, same "
              f"run): p50 {_ms(base['p50_ms'])} against the bundle's {_ms(base['bundle_p50_ms'])}: the bundle is "
              f"**{base['speedup_p50']:.2f}x** as fast.")
    rows = []
    for s in bench.get("settings") or []:
        if s.get("ok"):
            lm = s["latency_ms"]
            rows.append([s.get("id", "?"), _int(lm.get("runs")), _ms(lm.get("p50")), _ms(lm.get("p95")),
                         _ms(lm.get("p99")), _ms(lm.get("max")), _bytes(s.get("peak_rss_bytes"))])
        else:
            rows.append([s.get("id", "?"), "failed", "-", "-", "-", "-", "-"])
    if rows:
        doc.table(Table(["setting", "runs", "p50", "p95", "p99", "max", "peak RSS"], rows, right={1, 2, 3, 4, 5, 6}))


def _plot_latency_profile(bench: dict, budget: float | None, where: str) -> bytes:
    fig, ax = _figure(8.5, 4.6)
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
    return _png(fig)


def _plot_latency_samples(samples: np.ndarray, bench: dict, budget: float | None, where: str) -> bytes:
    fig, ax = _figure(7.5, 4.6)
    pos = samples[samples > 0]
    wide = pos.size and pos.max() / pos.min() > 20
    bins = np.geomspace(pos.min(), pos.max(), 60) if wide else 60
    ax.hist(samples, bins=bins, color="#1f77b4", alpha=0.85)
    if wide:
        ax.set_xscale("log")
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        v = float(np.percentile(samples, q))
        ax.axvline(v, color="black", ls=style, lw=1, label=f"p{q} {_ms(v)}")
    if budget and pos.size and budget > pos.max() * 3:  # drawing it would squash the histogram to a line
        p95 = float(np.percentile(samples, 95))
        ax.text(0.98, 0.97, f"p95 budget {budget:g} ms: off this scale\n(p95 {_ms(p95)} is {budget / p95:,.0f}x under it)",
                transform=ax.transAxes, ha="right", va="top", fontsize=8, color="#d62728",
                bbox={"facecolor": "white", "edgecolor": "#d62728", "alpha": 0.9})
    else:
        _budget_line(ax, budget, horizontal=False)
    ax.set_xlabel("latency per inference (ms)")
    ax.set_ylabel("runs")
    ax.set_title(f"Latency at batch 1: {samples.size:,} runs\n{where}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    return _png(fig)


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


# --- matplotlib helpers -------------------------------------------------------------------------


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


# --- rendering ----------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1200px;
padding:0 16px;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f2f4f7;text-align:left;vertical-align:bottom}td.r{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}td.ok{color:#137333;font-weight:600}td.bad{color:#b3261e;font-weight:700}
td.unknown{color:#777}figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #e3e3e3}
figcaption{font-size:.88em;color:#444;max-width:900px}.note{color:#8a5300;background:#fff7e6;border-left:4px solid #f0a020;
padding:4px 10px}code{background:#f2f4f7;padding:0 3px;border-radius:3px}.wrap{overflow-x:auto}
"""


def _inline_html(text: str) -> str:
    """The small Markdown subset the report uses (`code`, **bold**) as HTML, escaped."""
    out, parts = [], text.split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            bold = html.escape(part).split("**")
            out.append("".join(f"<strong>{b}</strong>" if j % 2 else b for j, b in enumerate(bold)))
    return "".join(out)


def _render_html(doc: Doc, title: str) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for kind, block in doc.blocks:
        if kind == "h2":
            body.append(f"<h2>{html.escape(block)}</h2>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(block)}</p>")
        elif kind == "note":
            body.append(f'<p class="note">{_inline_html(block)}</p>')
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
            rows = []
            for r, row in enumerate(block.rows):
                cells = []
                for c, cell in enumerate(row):
                    cls = [("r" if c in block.right else "")] + ([block.classes[r][c]] if block.classes else [])
                    cls_attr = " ".join(x for x in cls if x)
                    attr = f' class="{cls_attr}"' if cls_attr else ""
                    cells.append(f"<td{attr}>{_inline_html(cell)}</td>")
                rows.append("<tr>" + "".join(cells) + "</tr>")
            body.append(f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
        elif kind == "image":
            data = base64.b64encode(block.png).decode("ascii")
            body.append(
                f'<figure id="{block.name}"><img src="data:image/png;base64,{data}" alt="{html.escape(block.title)}" '
                f'title="{html.escape(block.title)}"><figcaption>{_inline_html(block.caption)}</figcaption></figure>'
            )
    if doc.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_inline_html(n)}</li>" for n in doc.notes) + "</ul>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_markdown(doc: Doc, title: str) -> str:
    out = [f"# {title}", ""]
    for kind, block in doc.blocks:
        if kind == "h2":
            out += [f"## {block}", ""]
        elif kind == "p":
            out += [block, ""]
        elif kind == "note":
            out += [f"> **Note**: {block}", ""]
        elif kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
            out.append("|" + "|".join("---:" if i in block.right else "---" for i in range(len(block.headers))) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
        elif kind == "image":
            out += [f"![{block.title}]({ASSETS_DIR}/{block.name}.png)", "", f"*{block.caption}*", ""]
    if doc.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in doc.notes] + [""]
    return "\n".join(out)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write(doc: Doc, build_dir: Path, title: str) -> dict[str, Path]:
    assets = build_dir / ASSETS_DIR
    assets.mkdir(exist_ok=True)
    out: dict[str, Path] = {}
    written = set()
    for kind, block in doc.blocks:
        if kind == "image":
            path = assets / f"{block.name}.png"
            _atomic_write(path, block.png)
            out[block.name] = path
            written.add(block.name)
    from .report_continual import IMAGES as MULTITASK_IMAGES

    for name in IMAGES + MULTITASK_IMAGES:  # a plot skipped this time must not leave last time's picture behind
        if name not in written:
            (assets / f"{name}.png").unlink(missing_ok=True)
    md, page = build_dir / REPORT_MD, build_dir / REPORT_HTML
    _atomic_write(md, _render_markdown(doc, title).encode("utf-8"))
    _atomic_write(page, _render_html(doc, title).encode("utf-8"))
    return {"html": page, "markdown": md, "assets": assets, **out}
