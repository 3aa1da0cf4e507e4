"""Quality figures of the task kinds beyond classification, numpy only (shipped in every bundle).

The build (export gate, manifest) and the device (verify, bench) compute them with this one
module, so both sides count the same thing:

* reconstruction (autoencoders): the anomaly score of a sample is its reconstruction error, the
  mean squared difference between the model's output and its own (preprocessed) input; ``mse``
  is the mean score; ``auc`` is the ROC AUC of the score against the anomaly flags (1 anomalous,
  0 normal) when both kinds are present (the Mann-Whitney rank formula, ties counted half).
* regression: the model outputs standardized targets; ``postprocess`` maps them to real units
  (``value = output * scale + offset``, per output); ``mae``, ``rmse`` (over every output) and
  ``r2`` (the mean over outputs of ``1 - SSE / SST``, as scikit-learn's ``r2_score``) are in
  those units.
* ``relative_error``: RMS of (output - reference) over the standard deviation of the reference
  outputs: how far an exported model's outputs are from the torch model's, whatever the task.
"""

import numpy as np

TASKS = ("classification", "reconstruction", "regression")
# The headline figure of each task and whether higher is better (a reconstruction without any sample
# marked anomalous falls back to MSE, lower is better: see ``headline``).
HEADLINE = {"classification": ("accuracy", True), "reconstruction": ("auc", True), "regression": ("r2", True)}


def _rows(a):
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)


def reconstruction_errors(outputs, targets):
    """Per-sample mean squared error between outputs and targets (same element count per sample)."""
    o, t = _rows(outputs), _rows(targets)
    if o.shape != t.shape:
        raise ValueError("outputs have %d values per sample, the inputs %d: the model does not reconstruct its "
                         "input" % (o.shape[1], t.shape[1]))
    return np.mean((o - t) ** 2, axis=1)


def roc_auc(scores, labels):
    """ROC AUC of ``scores`` for ``labels`` (truthy = positive); None unless both classes occur."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    _, inverse, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based; tied scores share their mean rank
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = average_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores, labels):
    """(false positive rates, true positive rates), one point per distinct threshold, from (0, 0)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / max(1, int(y.sum()))]
    fpr = np.r_[0.0, fp / max(1, int((~y).sum()))]
    return fpr, tpr


def postprocess(outputs, postprocessing):
    """Model outputs -> real units: ``outputs * scale + offset`` (scalars or one value per output)."""
    out = _rows(outputs)
    post = postprocessing or {}
    scale = np.asarray(post.get("scale", 1.0), dtype=np.float64).reshape(-1)
    offset = np.asarray(post.get("offset", 0.0), dtype=np.float64).reshape(-1)
    for name, v in (("scale", scale), ("offset", offset)):
        if v.size not in (1, out.shape[1]):
            raise ValueError("postprocessing.%s has %d values for %d outputs" % (name, v.size, out.shape[1]))
    return out * scale + offset


def regression_metrics(pred, true):
    """``{"mae", "rmse", "r2", "samples"}`` in the units of ``true`` (None where undefined)."""
    p, t = _rows(pred), _rows(true)
    if p.shape != t.shape:
        raise ValueError("predictions have %d values per sample, the targets %d" % (p.shape[1], t.shape[1]))
    if p.shape[0] == 0:
        return {"mae": None, "rmse": None, "r2": None, "samples": 0}
    err = p - t
    sst = ((t - t.mean(axis=0)) ** 2).sum(axis=0)
    sse = (err ** 2).sum(axis=0)
    defined = sst > 0
    r2 = float(np.mean(1.0 - sse[defined] / sst[defined])) if defined.any() else None
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())), "r2": r2,
            "samples": int(p.shape[0])}


def reconstruction_metrics(outputs, targets, anomaly=None):
    """``{"mse", "auc", "samples", "anomalous"}``: ``auc`` is None without both normal and anomalous samples."""
    errors = reconstruction_errors(outputs, targets)
    flags = None if anomaly is None else np.asarray(anomaly).reshape(-1)
    if flags is not None and flags.size != errors.size:
        raise ValueError("%d anomaly flags for %d samples" % (flags.size, errors.size))
    return {"mse": float(errors.mean()) if errors.size else None,
            "auc": None if flags is None else roc_auc(errors, flags),
            "samples": int(errors.size), "anomalous": None if flags is None else int(np.count_nonzero(flags))}


def relative_error(outputs, reference):
    """RMS(outputs - reference) / std(reference), over every value (0 when both are equal)."""
    o, r = _rows(outputs), _rows(reference)
    if o.shape != r.shape:
        raise ValueError("outputs have shape %s, the reference %s" % (list(o.shape), list(r.shape)))
    rms = float(np.sqrt(np.mean((o - r) ** 2))) if o.size else 0.0
    spread = float(np.std(r)) if r.size else 0.0
    if rms == 0.0:
        return 0.0
    return rms / spread if spread > 0 else float("inf")


def task_metrics(task, outputs, y, model_inputs=None, postprocessing=None):
    """The figures of ``task`` from a model's float outputs on some samples.

    ``y``: class labels (classification), anomaly flags (reconstruction; may be all 0), real-unit
    targets (regression). ``model_inputs``: the preprocessed inputs (reconstruction targets)."""
    if task == "classification":
        labels = np.asarray(y).reshape(-1)
        pred = _rows(outputs).argmax(axis=1)
        return {"accuracy": float(np.mean(pred == labels)) if labels.size else None, "samples": int(labels.size)}
    if task == "reconstruction":
        return reconstruction_metrics(outputs, model_inputs, y)
    if task == "regression":
        return regression_metrics(postprocess(outputs, postprocessing), y)
    raise ValueError("unknown task %r (one of %s)" % (task, ", ".join(TASKS)))


def headline(task, metrics):
    """(name, value, higher_is_better) of the figure a task is judged by: accuracy, AUC (MSE when no
    sample is marked anomalous: lower is better), R^2."""
    name, higher = HEADLINE[task]
    if task == "reconstruction" and metrics.get("auc") is None:
        return "mse", metrics.get("mse"), False
    return name, metrics.get(name), higher


def within_tolerance(value, reference, higher_is_better, tol):
    """A headline figure at most ``tol`` worse than ``reference``: absolute for figures that are
    better higher (accuracy, AUC, R^2), relative for errors (MSE)."""
    if value is None or reference is None:
        return True
    if higher_is_better:
        return value >= reference - tol - 1e-12
    return value <= reference * (1.0 + tol) + 1e-12
