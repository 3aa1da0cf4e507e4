"""The build-level sections of the report: the header (what was shipped), the stage table, the
target's budgets, accuracy against size, per-layer sparsity, one layer's weights before and after
sharing (read from the stage cache), the confusion matrix of the shipped bundle on its eval set, and
the latency distribution from a bench result. Each adds its blocks to the document; what cannot be
drawn is skipped with a note saying why.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgec.build_layout import BENCH_FILE, BUNDLE_DIR

from .document import Doc, Image, Table, fmt_bytes, fmt_int, fmt_metric, fmt_ms, fmt_pct
from .plots import (plot_confusion, plot_latency_profile, plot_latency_samples, plot_ops, plot_pareto,
                    plot_sharing, plot_sparsity)

CHECKPOINT_FILE = "model.pt"
# Image names these sections write into report/ (older copies not rewritten this time are removed).
IMAGES = ("accuracy_vs_bytes", "sparsity", "weight_sharing", "confusion", "latency")
MAX_CENTROIDS_SHOWN = 64  # prefer a layer whose codebook is small enough to see each centroid


# --- reading build.json -------------------------------------------------------------------------


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
    if info.get("deep_compression_bytes") is not None:
        return float(info["deep_compression_bytes"]), "Deep Compression estimate"
    if info.get("fp32_bytes") is not None:
        return float(info["fp32_bytes"]), "fp32 bytes"
    return None, ""


# --- sections -----------------------------------------------------------------------------------


def header(doc: Doc, build_dir: Path, summary: dict, manifest: dict | None) -> None:
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
                     f"`{first['stage']}` model ({fmt_int(first['info']['fp32_bytes'])} bytes)")
        doc.p(
            f"Shipped: `{(manifest or {}).get('model_file', 'bundle')}` ({info.get('precision', '?')}), accuracy "
            f"{fmt_metric(info.get('accuracy'))} (the model it was exported from: "
            f"{fmt_metric(info.get('reference_accuracy'))}; top-1 agreement {fmt_metric(info.get('top1_agreement'))}), "
            f"transport {fmt_int(info.get('transport_bytes'))} "
            f"bytes{ratio}."
        )
    elif not export:
        doc.p("This build's chain does not end in export: there is no bundle (no budgets, confusion matrix or latency).")


def stage_section(doc: Doc, summary: dict) -> None:
    doc.h2("Stages")
    headers = ["stage", "status", "accuracy", "Δ accuracy", "params", "non-zeros", "sparsity",
               "distinct values (max/layer)", "fp32 bytes", "Deep Compression est. bytes", "model bytes", "transport bytes", "time (s)"]
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
            name, status, fmt_metric(acc), delta, fmt_int(info.get("params")), fmt_int(info.get("nonzero_params")),
            fmt_pct(_sparsity(info)), fmt_int(max(distinct.values())) if distinct else "-",
            fmt_int(info.get("fp32_bytes")), fmt_int(info.get("deep_compression_bytes")), fmt_int(info.get("model_bytes")),
            fmt_int(info.get("transport_bytes")),
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
        "the stage reports it, else of all parameters. Deep Compression est. bytes: Han's sparse-index, codebook "
        "and Huffman format counted from the stage's weights (`deep_compression_bytes`, stages that prune or "
        "share; an estimate, nothing ships it). Model / transport bytes: the exported model file and its "
        "transport payload (`model.<ext>.edgt`), what is sent to the device."
    )


def budget_section(doc: Doc, manifest: dict | None, bench: dict | None) -> None:
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
            verdict += f" (p50 {fmt_ms(r['p50_ms']['bundle'])} vs uncompressed {fmt_ms(r['p50_ms']['uncompressed'])})"
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


def pareto_section(doc: Doc, summary: dict) -> None:
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
        png = plot_pareto(points)
    except Exception as e:
        doc.skipped("accuracy against size", f"the plot failed ({type(e).__name__}: {e})")
        return
    doc.image(Image(
        "accuracy_vs_bytes", "Accuracy against bytes, every stage", png,
        "Test accuracy of every stage's model against its size on a log axis. Model stages count "
        "their Deep Compression estimate (`deep_compression_bytes`) when they record it (square) else their dense fp32 bytes (circle); the bundle "
        "counts its transport bytes (star). The solid line joins the Pareto-optimal points (no other point is "
        "both smaller and more accurate); the dotted line is the build order.",
    ))


def sparsity_section(doc: Doc, summary: dict) -> None:
    doc.h2("Sparsity per layer")
    stages = [s for s in summary["stages"] if ((s.get("info") or {}).get("sparsity") or {}).get("layers")]
    if not stages:
        doc.skipped("per-layer sparsity", "no stage in this build reports per-layer sparsity (no prune / share stage)")
        return
    try:
        png = plot_sparsity(stages)
    except Exception as e:
        doc.skipped("per-layer sparsity", f"the plot failed ({type(e).__name__}: {e})")
        return
    doc.image(Image("sparsity", "Per-layer sparsity", png,
                    "Share of each prunable layer's weights that are zero (or masked), per stage that reports it; "
                    "the label under each layer is its weight count."))
    last = stages[-1]
    distinct = last["info"].get("distinct_values") or {}
    rows = [[r["layer"], fmt_int(r["params"]), fmt_int(r["nonzero"]), fmt_pct(r["sparsity"]),
             fmt_int(distinct.get(r["layer"]))] for r in last["info"]["sparsity"]["layers"]]
    doc.p(f"Layers after `{last['stage']}`, the last stage that reports them:")
    doc.table(Table(["layer", "weights", "non-zeros", "sparsity", "distinct values"], rows, right={1, 2, 3, 4}))


def sharing_section(doc: Doc, summary: dict) -> None:
    doc.h2("Weight sharing")
    stages = summary["stages"]
    idx = next(i for i, s in enumerate(stages) if s.get("kind", s["stage"]) == "share")
    what = "weight histogram before and after sharing"
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
        from edgec.base.checkpoint import load_checkpoint

        before, after = load_checkpoint(paths[0]), load_checkpoint(paths[1])
        layer = _pick_shared_layer(after)
        if layer is None:
            doc.skipped(what, f"the {after_stage['stage']} checkpoint has no codebooks")
            return
        w_before = _kept_weights(before, layer)
        w_after = _kept_weights(after, layer)
        centroids = after.codebooks[layer].detach().float().cpu().numpy().ravel()
        png = plot_sharing(layer, w_before, w_after, centroids, before_stage["stage"], after_stage["stage"])
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


def run_bundle(doc: Doc, what: str, bundle_dir: Path, measure):
    """Run the shipped bundle on its eval set on this machine: ``(bundle, y, measure(bundle, model, x, y),
    runtime)``; None once ``what`` is skipped in ``doc`` (no eval set, no runtime for it here, a corrupt file)."""
    try:
        from edgec.ondevice import load_bundle

        bundle = load_bundle(str(bundle_dir))
        ev = bundle.eval_set()
        if ev is None:
            doc.skipped(what, "the bundle has no eval.npz")
            return None
        x, y = ev
        model = bundle.open_model()
        try:
            measured = measure(bundle, model, x, y)
        finally:
            model.close()
        runtime = model.runtime.as_dict()
    except Exception as e:  # a missing runtime on this machine, a corrupt file: report, don't fail
        doc.skipped(what, f"the bundle's model could not be run here ({type(e).__name__}: {' '.join(str(e).split())[:300]})")
        return None
    return bundle, y, measured, runtime


def confusion_section(doc: Doc, bundle_dir: Path, manifest: dict | None) -> None:
    """Classification bundles (edgec.report.tasks draws the others)."""
    doc.h2("Confusion matrix of the shipped bundle")
    what = "confusion matrix"
    if manifest is None:
        doc.skipped(what, "no bundle in this build")
        return

    def classify(bundle, model, x, y):
        return np.asarray(model.predict_raw(x)).reshape(len(x), -1).argmax(axis=1), bundle.labels()

    ran = run_bundle(doc, what, bundle_dir, classify)
    if ran is None:
        return
    bundle, y, (pred, labels), runtime = ran
    n = max(int(y.max(initial=-1)) + 1, int(pred.max(initial=-1)) + 1, len(labels))
    labels = (labels + [str(i) for i in range(len(labels), n)])[:n]
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    acc = float(np.trace(cm) / max(1, cm.sum()))
    try:
        png = plot_confusion(cm, labels, acc, f"{bundle.model_file} via {runtime.get('package')} {runtime.get('version')}")
    except Exception as e:
        doc.skipped(what, f"the plot failed ({type(e).__name__}: {e})")
        return
    recorded = (manifest.get("metrics") or {}).get("accuracy")
    doc.image(Image(
        "confusion", "Confusion matrix of the shipped bundle", png,
        f"`{bundle.model_file}` run on this machine on the bundle's eval set ({len(y):,} samples): accuracy "
        f"{acc:.4f} (manifest: {fmt_metric(recorded)}). Rows: true class; columns: predicted class.",
    ))
    worst = sorted(((cm[i, j], labels[i], labels[j]) for i in range(n) for j in range(n) if i != j and cm[i, j]),
                   reverse=True)[:3]
    if worst:
        doc.p("Most frequent confusions: " + ", ".join(f"{t} → {p} ({c}x)" for c, t, p in worst) + ".")


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


def latency_section(doc: Doc, bench: dict | None, manifest: dict | None, build_dir: Path) -> None:
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
        png = plot_latency_samples(samples, budget, where) if samples is not None else \
            plot_latency_profile(bench, budget, where)
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
        f"dashed red line{off_scale}. Best setting `{(bench.get('best') or {}).get('id', '?')}`: p50 {fmt_ms(lat.get('p50'))}, "
        f"p95 {fmt_ms(lat.get('p95'))}, p99 {fmt_ms(lat.get('p99'))} over {fmt_int(lat.get('runs'))} runs.",
    ))
    base = bench.get("baseline") or {}
    if base.get("speedup_p50"):
        doc.p(f"Uncompressed model (`uncompressed.pt`, exported {base.get('precision', '?')} for this target, same harness, same "
              f"run): p50 {fmt_ms(base['p50_ms'])} against the bundle's {fmt_ms(base['bundle_p50_ms'])}: the bundle is "
              f"**{base['speedup_p50']:.2f}x** as fast."
              + _paired_sentence(base.get("speedup")))
    _ops_chart(doc, bench.get("ops_profile"))
    rows = []
    for s in bench.get("settings") or []:
        if s.get("ok"):
            lm = s["latency_ms"]
            rows.append([s.get("id", "?"), fmt_int(lm.get("runs")), fmt_ms(lm.get("p50")), fmt_ms(lm.get("p95")),
                         fmt_ms(lm.get("p99")), fmt_ms(lm.get("max")), fmt_bytes(s.get("peak_rss_bytes"))])
        else:
            rows.append([s.get("id", "?"), "failed", "-", "-", "-", "-", "-"])
    if rows:
        doc.table(Table(["setting", "runs", "p50", "p95", "p99", "max", "peak RSS"], rows, right={1, 2, 3, 4, 5, 6}))


def _paired_sentence(paired: Any) -> str:
    if not isinstance(paired, dict) or not paired.get("rounds"):
        return ""
    return (f" Timed side by side in {paired['rounds']} interleaved rounds: median {paired['median']:.2f}x, range "
            f"{paired['min']:.2f}-{paired['max']:.2f}x, {paired['confidence']:.0%} lower bound **{paired['lower_bound']:.2f}x** "
            "(the figure the `min_speedup` budget judges).")


def _ops_chart(doc: Doc, profile: Any) -> None:
    """``edgec bench --ops``: where the time goes, heaviest operators first."""
    if not isinstance(profile, dict) or not profile.get("ops"):
        if isinstance(profile, dict) and profile.get("error"):
            doc.skipped("per-op profile", str(profile["error"]))
        return
    try:
        png = plot_ops(profile["ops"])
    except Exception as e:
        doc.skipped("per-op profile", f"the plot failed ({type(e).__name__}: {e})")
        return
    graph = profile.get("graph_us")
    doc.image(Image(
        "ops", "Time per operator", png,
        f"{profile.get('runtime', '?')}: {profile.get('method', '?')}. Bars: mean time per call of each operator "
        f"(heaviest first; grey: not delegated)."
        + (f" Whole graph {graph:.1f} us; the operators add up to {profile.get('sum_us', 0):.1f} us." if graph else ""),
    ))
