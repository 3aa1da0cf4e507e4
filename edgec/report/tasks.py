"""The build report's section for regression and reconstruction bundles (``edgec.report`` calls
:func:`task_section` instead of the confusion matrix when the manifest's ``task`` is not classification).

Reconstruction (autoencoders): a few eval samples beside their reconstructions (image inputs), the
histogram of the anomaly score (reconstruction error) of normal and anomalous samples, and the ROC
curve of the score when the eval set marks anomalies. Regression: predicted against true values, in
real units. Everything is measured by running the shipped bundle on its own eval set on this
machine, with the on-device runner's figures (``edgec/ondevice/metrics.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .document import Doc, Image, Table, fmt_metric
from .plots import figure, png
from .sections import run_bundle

IMAGES = ("reconstructions", "error_histogram", "roc", "predicted_vs_true")
MAX_SHOWN = 8


def task_section(doc: Doc, bundle_dir: Path, manifest: dict[str, Any]) -> None:
    from edgec.ondevice import metrics as M
    from edgec.ondevice.evaluate import task_quality
    from edgec.ondevice.preprocess import preprocess_raw

    task = manifest.get("task")
    doc.h2("Reconstruction of the shipped bundle" if task == "reconstruction" else "Predictions of the shipped bundle")

    def measure(bundle, model, x, y):
        return (np.asarray(model.predict_raw(x)),
                preprocess_raw(x, model.preprocessing, model.sample_shape, model.input_layout),
                task_quality(model, x, y, task, manifest.get("postprocessing")))

    ran = run_bundle(doc, "task figures", bundle_dir, measure)
    if ran is None:
        return
    bundle, y, (outputs, inputs, quality), runtime = ran
    where = f"`{bundle.model_file}` via {runtime.get('package')} {runtime.get('version')}"
    metrics = manifest.get("metrics") or {}
    _figures_table(doc, quality, metrics)
    if task == "reconstruction":
        scores = M.reconstruction_errors(outputs, inputs)
        _reconstructions(doc, inputs, outputs, y, scores, where)
        _histogram(doc, scores, y, where)
        _roc(doc, scores, y, where)
    else:
        pred = M.postprocess(outputs, manifest.get("postprocessing"))
        _scatter(doc, pred, np.asarray(y, dtype=np.float64).reshape(len(y), -1), bundle.labels(), quality, where)


def _figures_table(doc: Doc, quality: dict, metrics: dict) -> None:
    names = [k for k in ("mse", "auc", "mae", "rmse", "r2") if k in quality]
    rows = [[k, fmt_metric(quality.get(k)), fmt_metric(metrics.get(f"eval_{k}")), fmt_metric(metrics.get(k)),
             fmt_metric(metrics.get(f"reference_{k}"))] for k in names]
    doc.table(Table(["figure", "eval set, run here", "eval set, at export", "test split, bundle", "test split, fp32 reference"],
                    rows, right={1, 2, 3, 4}))
    doc.p(f"Headline figure: **{quality.get('metric')}** on {quality.get('eval_samples', 0):,} eval samples; the export "
          f"gate measured a relative output error of {fmt_metric(metrics.get('relative_error'))} against the fp32 reference "
          "(RMS of the difference over the reference's standard deviation).")


def _reconstructions(doc: Doc, inputs: np.ndarray, outputs: np.ndarray, flags: np.ndarray, scores: np.ndarray, where: str) -> None:
    shape = inputs.shape[1:]
    if len(shape) != 3 or shape[0] not in (1, 3):
        doc.skipped("reconstructions", f"inputs of shape {list(shape)} are not images")
        return
    flags = np.asarray(flags).reshape(-1).astype(bool)
    normal, anomalous = np.flatnonzero(~flags), np.flatnonzero(flags)
    half = MAX_SHOWN // 2 if anomalous.size else MAX_SHOWN
    chosen = list(normal[:half]) + list(anomalous[: MAX_SHOWN - min(half, normal.size)])
    if not chosen:
        return
    fig, axes = figure(1.4 * len(chosen), 3.2, (2, len(chosen)), squeeze=False)
    recon = outputs.reshape((len(outputs),) + shape)
    lo, hi = float(inputs.min()), float(inputs.max())
    for j, i in enumerate(chosen):
        for row, img in enumerate((inputs[i], recon[i])):
            ax = axes[row][j]
            pic = img[0] if shape[0] == 1 else np.clip((img.transpose(1, 2, 0) - lo) / max(hi - lo, 1e-12), 0, 1)
            ax.imshow(pic, cmap="gray" if shape[0] == 1 else None, vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(("anomalous" if flags[i] else "normal") + f"\nscore {scores[i]:.4f}", fontsize=7)
    axes[0][0].set_ylabel("input", fontsize=8)
    axes[1][0].set_ylabel("reconstruction", fontsize=8)
    doc.image(Image("reconstructions", "Inputs and their reconstructions", png(fig),
                    f"Eval samples (top) and the bundle's reconstructions (bottom), {where}; the score is the "
                    "reconstruction error (mean squared difference, model-input units)."))


def _histogram(doc: Doc, scores: np.ndarray, flags: np.ndarray, where: str) -> None:
    flags = np.asarray(flags).reshape(-1).astype(bool)
    fig, ax = figure(7.0, 4.0)
    pos = scores[scores > 0]
    wide = pos.size and pos.max() / pos.min() > 50
    bins = np.geomspace(pos.min(), pos.max(), 50) if wide else 50
    ax.hist(scores[~flags], bins=bins, alpha=0.7, color="#1f77b4", label=f"normal ({int((~flags).sum())})")
    if flags.any():
        ax.hist(scores[flags], bins=bins, alpha=0.6, color="#d62728", label=f"anomalous ({int(flags.sum())})")
    if wide:
        ax.set_xscale("log")
    ax.set_xlabel("anomaly score (reconstruction error)")
    ax.set_ylabel("eval samples")
    ax.set_title("Reconstruction error of the shipped bundle", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    doc.image(Image("error_histogram", "Reconstruction error histogram", png(fig),
                    f"Anomaly score of every eval sample, {where}: normal and anomalous samples should separate."))


def _roc(doc: Doc, scores: np.ndarray, flags: np.ndarray, where: str) -> None:
    from edgec.ondevice import metrics as M

    auc = M.roc_auc(scores, flags)
    if auc is None:
        doc.skipped("ROC curve", "the eval set does not mark both normal and anomalous samples")
        return
    fpr, tpr = M.roc_curve(scores, flags)
    fig, ax = figure(4.8, 4.6)
    ax.plot(fpr, tpr, color="#d62728", lw=2, label=f"bundle, AUC {auc:.4f}")
    ax.plot([0, 1], [0, 1], ":", color="#999999", lw=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (normal samples flagged)")
    ax.set_ylabel("true positive rate (anomalies caught)")
    ax.set_title("ROC of the anomaly score", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    doc.image(Image("roc", "ROC curve", png(fig), f"Thresholding the reconstruction error, {where}."))


def _scatter(doc: Doc, pred: np.ndarray, true: np.ndarray, labels: list[str], quality: dict, where: str) -> None:
    k = min(pred.shape[1], 4)
    fig, axes = figure(4.4 * k, 4.2, (1, k), squeeze=False)
    for j, ax in enumerate(axes[0]):
        t, p = true[:, j], pred[:, j]
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        ax.scatter(t, p, s=12, alpha=0.7, color="#1f77b4", edgecolors="none")
        ax.plot([lo, hi], [lo, hi], "--", color="#d62728", lw=1, label="predicted = true")
        name = labels[j] if j < len(labels) else f"y{j}"
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Predicted against true: R² {fmt_metric(quality.get('r2'))}, MAE {fmt_metric(quality.get('mae'))}, "
                 f"RMSE {fmt_metric(quality.get('rmse'))}", fontsize=10)
    more = f" (the first {k} of {pred.shape[1]} targets)" if pred.shape[1] > k else ""
    doc.image(Image("predicted_vs_true", "Predicted against true", png(fig),
                    f"The bundle's predictions on its eval set in real units{more}, {where}."))
