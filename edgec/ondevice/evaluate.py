"""Numeric checks: test-vector reproduction, top-1 agreement, accuracy, predictions."""

import numpy as np

from .metrics import headline, postprocess, reconstruction_errors, task_metrics
from .preprocess import preprocess_raw

MAX_LISTED_FAILURES = 20


def _flat(a):
    a = np.asarray(a)
    return a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)


def top1_agreement(a, b):
    """Fraction of rows whose argmax agrees (None for empty input)."""
    a, b = _flat(a), _flat(b)
    if a.shape[0] == 0:
        return None
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def compare_outputs(got, expected, atol, exact=False):
    """Compare runtime outputs with expected outputs, vector by vector.

    Returns ``{"ok", "count", "atol", "exact", "max_abs_diff", "mean_abs_diff", "worst_index",
    "n_failed", "failed_indices" (first 20), "top1_agreement"}``. With ``exact`` a vector fails
    unless its float32 outputs are bit-identical; otherwise when any |diff| > atol (NaN fails).
    """
    got = np.asarray(got, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    res = {"ok": False, "count": int(expected.shape[0]) if expected.ndim else 1, "atol": float(atol),
           "exact": bool(exact), "max_abs_diff": None, "mean_abs_diff": None, "worst_index": None,
           "n_failed": None, "failed_indices": [], "top1_agreement": None, "error": None}
    g, e = _flat(got), _flat(expected)
    if g.shape != e.shape:
        res["error"] = "outputs have shape %s, expected %s" % (list(got.shape), list(expected.shape))
        return res
    if g.shape[0] == 0:
        res["error"] = "no test vectors"
        return res
    diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
    per_vec = diff.max(axis=1)
    nan = np.isnan(per_vec)
    if exact:
        bad = np.any(g.view(np.uint32) != e.view(np.uint32), axis=1)
    else:
        bad = nan | ~(per_vec <= float(atol))
    finite = per_vec[~nan]
    res["max_abs_diff"] = float("nan") if nan.any() else float(finite.max())
    res["mean_abs_diff"] = float(diff[~nan].mean()) if (~nan).any() else float("nan")
    res["worst_index"] = int(np.argmax(np.where(nan, np.inf, per_vec)))
    idx = np.flatnonzero(bad)
    res["n_failed"] = int(idx.size)
    res["failed_indices"] = [int(i) for i in idx[:MAX_LISTED_FAILURES]]
    res["top1_agreement"] = top1_agreement(g, e)
    res["ok"] = idx.size == 0
    return res


def check_vectors(model, vectors, atol, exact=False):
    """Run ``vectors["inputs"]`` (float32 model inputs) and compare with ``vectors["expected"]``.

    Adds ``reference_top1_agreement`` / ``reference_max_abs_diff`` (vs the torch fp32
    ``reference`` outputs, informational) when the file has them."""
    x = np.asarray(vectors["inputs"], dtype=np.float32)
    got = model.run_model_input(x)
    res = compare_outputs(got, vectors["expected"], atol, exact)
    ref = vectors.get("reference")
    if ref is not None and _flat(ref).shape == _flat(got).shape:
        res["reference_top1_agreement"] = top1_agreement(got, ref)
        res["reference_max_abs_diff"] = float(np.max(np.abs(_flat(got).astype(np.float64)
                                                            - _flat(ref).astype(np.float64))))
    return res


def accuracy(model, x_raw, y):
    """Top-1 accuracy of ``model.predict_raw`` on raw samples: ``{"accuracy", "correct", "eval_samples"}``."""
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if y.size == 0:
        return {"accuracy": None, "correct": 0, "eval_samples": 0}
    logits = model.predict_raw(x_raw)
    pred = _flat(logits).argmax(axis=1)
    correct = int(np.sum(pred == y))
    return {"accuracy": correct / float(y.size), "correct": correct, "eval_samples": int(y.size)}


def predict_labels(model, raw, labels=()):
    """Raw samples -> ``[{"index", "class", "label", "score"}]`` (score: the top logit).

    Regression bundles: ``score`` is the first target in real units, ``values`` all of them and
    ``label`` names them; reconstruction bundles: ``score`` is the anomaly score (reconstruction
    error), ``label`` "anomaly score"."""
    task = getattr(model, "task", "classification")
    if task != "classification":
        return _predict_task(model, raw, labels, task)
    logits = _flat(model.predict_raw(raw))
    out = []
    for i, row in enumerate(logits):
        c = int(np.argmax(row))
        out.append({"index": i, "class": c, "label": labels[c] if c < len(labels) else str(c),
                    "score": float(row[c])})
    return out


def task_quality(model, x_raw, y, task=None, postprocessing=None):
    """The figures of a regression or reconstruction bundle (``metrics.py``) on raw samples and
    their targets (regression, real units) or anomaly flags (reconstruction): ``{"task", "metric",
    "value", "higher_is_better", <figures>, "eval_samples"}``."""
    task = task or getattr(model, "task", "classification")
    y = np.asarray(y)
    if len(y) == 0:
        return {"task": task, "metric": None, "value": None, "higher_is_better": None, "eval_samples": 0}
    outputs = model.predict_raw(x_raw)
    inputs = _model_inputs(model, x_raw) if task == "reconstruction" else None
    res = task_metrics(task, outputs, y, inputs, postprocessing or getattr(model, "postprocessing", None))
    name, value, higher = headline(task, res)
    res.pop("samples", None)
    return dict({"task": task, "metric": name, "value": value, "higher_is_better": higher}, eval_samples=int(len(y)),
                **res)


def _model_inputs(model, x_raw):
    return preprocess_raw(x_raw, model.preprocessing, model.sample_shape, model.input_layout)


def _predict_task(model, raw, labels, task):
    outputs = model.predict_raw(raw)
    if task == "reconstruction":
        scores = reconstruction_errors(outputs, _model_inputs(model, raw))
        return [{"index": i, "class": 0, "label": "anomaly score", "score": float(v)} for i, v in enumerate(scores)]
    values = postprocess(outputs, getattr(model, "postprocessing", None))
    names = list(labels) or ["y%d" % j for j in range(values.shape[1])]
    out = []
    for i, row in enumerate(values):
        shown = ", ".join("%s=%.6g" % (names[j] if j < len(names) else "y%d" % j, v) for j, v in enumerate(row))
        out.append({"index": i, "class": 0, "label": shown, "score": float(row[0]), "values": [float(v) for v in row]})
    return out
