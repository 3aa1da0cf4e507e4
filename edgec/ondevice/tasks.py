"""Multi-task bundles: the manifest's ``tasks`` section, per-task models and the tasks transport payload.

numpy + stdlib only, relative imports (this package ships inside every bundle).

A multi-task bundle (``edgec build`` with ``learn`` stages) lists its tasks in ``manifest.json``::

    "tasks": [{"name", "labels", "columns": [a, b], "data", "method", "model_file", "eval_file",
               "metrics": {...}, ["test_vectors_file", "outputs", "atol"]}, ...]

Methods with a shared backbone ship ONE model: every task's ``model_file`` is the bundle's
``model_file`` and task ``name`` reads output columns ``a:b``. PackNet ships a model per task (the
last task's is ``model_file``); ``tasks_transport`` then names ``model.tasks.edgt``, which rebuilds
every other task's file from the top-level model file:

    b"EDGTASK2" | u32 header bytes | u32 raw header bytes | header | sections      (little-endian)

The header is JSON in a raw LZMA2 stream (lc 3, lp 0, pb 0, 64 KiB dictionary): ``{"version": 2,
"base": {"file", "bytes", "sha256"}, "regions": [[start, end), ...], "levels": section, "residuals":
section, "files": [{"file", "bytes", "sha256", "mode": "masked", "level"} | {..., "mode": "full",
"data": section}]}``, a section being ``[offset, compressed bytes, raw bytes, lc, lp, pb, log2 dict
size]`` of a raw LZMA2 stream after the header. ``levels`` holds one byte per byte of the base file
inside ``regions`` (outside them the level is 1): the first task (1-based) whose model holds that
byte, listed in order of decreasing ``|int8 value|`` of the base byte (stable), which is how PackNet
hands out weights. A ``masked`` file of level L is ``(base where level <= L, else 0) + residual``
byte-wise modulo 256, its residual the L-th base-sized slice of ``residuals``; a ``full`` file is its
``data`` section.

Piggyback ships the unmasked backbone as ``model_file`` (its test vectors are the backbone's) and
every task's file as ``{..., "mode": "bitmask", "index": i, "ref": "ones" | "previous", "coding":
"bits" | "runs", ["order": "region" | "magnitude",] "flip_count": n, "flips": section}``: its mask
has one bit per byte of the base inside ``regions`` (set: the file keeps the base's byte, else 0),
coded as the ``n`` positions where it differs from all ones or from the previous bitmask file's mask,
taken in ``order`` (default ``region``; ``mask_codec``); ``scaled``, optional, lists float32 runs
predicted as the base's times a ratio (``apply_scaled``); the header's
``bit_residuals`` section holds one base-sized residual per file (the i-th), added byte-wise modulo
256.
"""

import hashlib
import json
import lzma
import struct

import numpy as np

from . import mask_codec
from .errors import BundleError, ManifestError, SettingsError
from .transport import TransportError, decompress_section

TASKS_MAGIC = b"EDGTASK2"
_HEAD = struct.Struct("<8sII")
MAX_HEADER = 16 << 20
MAX_TASKS = 4096
_REEXPORT = "re-export the bundle with edgec build"


# --- manifest ----------------------------------------------------------------------------------------


def bundle_tasks(manifest):
    """The validated ``tasks`` list of a manifest ([] for a single-task bundle). ManifestError
    (naming the key) when it is malformed."""
    tasks = manifest.get("tasks")
    if tasks is None:
        return []
    if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_TASKS:
        raise ManifestError("manifest.json: tasks should be a non-empty list", _REEXPORT)
    names = set()
    listed = set(f.get("name") for f in manifest.get("files") or [] if isinstance(f, dict))
    for i, t in enumerate(tasks):
        where = "tasks[%d]" % i
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise ManifestError("manifest.json: %s needs a name" % where, _REEXPORT)
        if t["name"] in names:
            raise ManifestError("manifest.json: task %r is listed twice" % t["name"], _REEXPORT)
        names.add(t["name"])
        cols = t.get("columns")
        if not (isinstance(cols, list) and len(cols) == 2 and all(isinstance(c, int) and not isinstance(c, bool)
                                                                 for c in cols) and 0 <= cols[0] < cols[1]):
            raise ManifestError("manifest.json: %s.columns should be [first, end) output columns" % where, _REEXPORT)
        labels = t.get("labels")
        if not isinstance(labels, list) or len(labels) != cols[1] - cols[0]:
            raise ManifestError("manifest.json: %s.labels should list one label per column" % where, _REEXPORT)
        for key in ("model_file", "eval_file", "test_vectors_file"):
            v = t.get(key)
            if v is not None and (not isinstance(v, str) or v not in listed):
                raise ManifestError("manifest.json: %s.%s %r is not listed in files" % (where, key, v), _REEXPORT)
        if t.get("metrics") is not None and not isinstance(t["metrics"], dict):
            raise ManifestError("manifest.json: %s.metrics should be an object" % where, _REEXPORT)
    return tasks


def select_task(bundle, name):
    """The task entry called ``name``; with ``name`` None the only task (SettingsError when the
    bundle serves several, naming them)."""
    tasks = bundle_tasks(bundle.manifest)
    if not tasks:
        if name is not None:
            raise SettingsError("--task %s: this bundle serves one task (it has no tasks section)" % name,
                                "drop --task")
        return None
    names = [t["name"] for t in tasks]
    if name is None:
        if len(tasks) == 1:
            return tasks[0]
        raise SettingsError("this bundle serves %d tasks (%s)" % (len(tasks), ", ".join(names)),
                            "choose one with --task NAME")
    for t in tasks:
        if t["name"] == name:
            return t
    raise SettingsError("--task %s: no such task in this bundle" % name, "tasks: %s" % ", ".join(names))


def task_labels(task):
    return [str(x) for x in task.get("labels") or []]


# --- per-task models --------------------------------------------------------------------------------


class TaskModel(object):
    """A task's view of an opened model: ``predict_raw`` / ``run_model_input`` return the task's
    output columns only; everything else is the model's."""

    def __init__(self, model, columns):
        self._model = model
        self.columns = (int(columns[0]), int(columns[1]))

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _cut(self, y):
        y = np.asarray(y)
        return y.reshape(y.shape[0], -1)[:, self.columns[0]:self.columns[1]]

    def predict_raw(self, raw, *args, **kwargs):
        return self._cut(self._model.predict_raw(raw, *args, **kwargs))

    def run_model_input(self, x, *args, **kwargs):
        return self._cut(self._model.run_model_input(x, *args, **kwargs))

    def close(self):
        self._model.close()


def open_full_task_model(bundle, task, settings=None, runtime=None):
    """The model file ``task`` runs (all of its output columns), opened like ``Bundle.open_model``."""
    model_file = task.get("model_file") or bundle.model_file
    if model_file == bundle.model_file:
        return bundle.open_model(settings, runtime=runtime)
    return bundle.with_model_file(model_file, task.get("outputs")).open_model(settings, runtime=runtime)


def open_task_model(bundle, task, settings=None, runtime=None):
    """``task``'s model, seeing only its columns (``predict_raw`` gives the task's logits)."""
    return TaskModel(open_full_task_model(bundle, task, settings, runtime), task["columns"])


# --- checks (verify, bench) -------------------------------------------------------------------------


def _check(name, ok, detail, skipped=False):
    return {"name": name, "ok": bool(ok), "skipped": bool(skipped), "detail": detail}


def verify_tasks(bundle, settings=None, runtime=None, exact=False, check_accuracy=True, only=None):
    """Per-task checks of a multi-task bundle: every task's own model file (PackNet) reproduces its
    test vectors, every task's accuracy on its eval file is within the manifest's tolerance of its
    recorded accuracy, and the tasks transport payload rebuilds every task's model file.

    Returns ``(checks, errors, per_task)``: checks as in verify (``task <name>: ...``), one-line
    errors, and ``{name: {"accuracy", "eval_samples", "manifest_accuracy"}}``."""
    from .evaluate import accuracy as eval_accuracy
    from .evaluate import check_vectors
    checks, errors, per_task = [], [], {}
    tasks = bundle_tasks(bundle.manifest)
    if only is not None:
        tasks = [select_task(bundle, only)]
    tol = (bundle.manifest.get("tolerance") or {}).get("accuracy")
    tol = 0.01 if tol is None else float(tol)
    transport = check_tasks_transport(bundle)
    if transport is not None:
        checks.append(transport)
        if not transport["ok"]:
            errors.append("tasks transport: " + transport["detail"])
    for t in tasks:
        name = "task %s" % t["name"]
        try:
            full = open_full_task_model(bundle, t, settings, runtime)
        except BundleError as e:
            errors.append("%s: load: %s" % (name, e))
            checks.append(_check(name + ": load", False, str(e)))
            continue
        try:
            if t.get("test_vectors_file"):
                vec = bundle._npz(t["test_vectors_file"], ("inputs", "expected"), 256 << 20)
                atol = float(t.get("atol") or bundle.atol)
                tv = check_vectors(full, vec, atol, exact=exact)
                if tv.get("error") or not tv["ok"]:
                    why = tv.get("error") or "%d/%d vectors differ (max|diff| %.3g)" % (
                        tv["n_failed"], tv["count"], tv["max_abs_diff"])
                    errors.append("%s: test_vectors: %s" % (name, why))
                    checks.append(_check(name + ": test_vectors", False, why))
                else:
                    checks.append(_check(name + ": test_vectors", True, "%d vectors of %s, max|diff| %.3g" % (
                        tv["count"], t.get("model_file"), tv["max_abs_diff"])))
            if not check_accuracy:
                continue
            if not t.get("eval_file"):
                checks.append(_check(name + ": accuracy", True, "no eval file", skipped=True))
                continue
            ev = bundle._npz(t["eval_file"], ("x", "y"), 1 << 30)
            acc = eval_accuracy(TaskModel(full, t["columns"]), ev["x"], ev["y"])
            # the export's own figure on exactly these samples (the whole-test accuracy differs from an
            # eval-set estimate by sampling noise, which is large for a task the model has forgotten)
            metrics = t.get("metrics") or {}
            want = metrics.get("eval_accuracy", metrics.get("accuracy"))
            per_task[t["name"]] = {"accuracy": acc["accuracy"], "eval_samples": acc["eval_samples"],
                                   "manifest_accuracy": want}
            detail = "%.4f on %d samples of %s" % (acc["accuracy"], acc["eval_samples"], t["eval_file"])
            if isinstance(want, (int, float)):
                detail += " (manifest %.4f, tolerance %.3g)" % (want, tol)
                if acc["accuracy"] < float(want) - tol - 1e-12:
                    errors.append("%s: accuracy %.4f is below the manifest's %.4f by more than %.3g" % (
                        name, acc["accuracy"], want, tol))
                    checks.append(_check(name + ": accuracy", False, detail))
                    continue
            checks.append(_check(name + ": accuracy", True, detail))
        except ManifestError as e:
            errors.append("%s: %s" % (name, e))
            checks.append(_check(name, False, str(e)))
        finally:
            full.close()
    return checks, errors, per_task


def task_accuracies(bundle, settings=None, runtime=None, only=None):
    """``{name: {"accuracy", "correct", "eval_samples", "manifest_accuracy"}}`` on each task's eval file."""
    from .evaluate import accuracy as eval_accuracy
    tasks = [select_task(bundle, only)] if only is not None else bundle_tasks(bundle.manifest)
    out = {}
    for t in tasks:
        if not t.get("eval_file"):
            continue
        ev = bundle._npz(t["eval_file"], ("x", "y"), 1 << 30)
        model = open_task_model(bundle, t, settings, runtime)
        try:
            acc = eval_accuracy(model, ev["x"], ev["y"])
        finally:
            model.close()
        acc["manifest_accuracy"] = (t.get("metrics") or {}).get("accuracy")
        out[t["name"]] = acc
    return out


# --- the tasks transport payload --------------------------------------------------------------------


def _section(payload, base, spec, max_raw):
    if not (isinstance(spec, list) and len(spec) == 7 and all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in spec)):
        raise TransportError("a section spec is malformed")
    off, zlen, raw, lc, lp, pb, d = spec
    if off < 0 or zlen < 0 or base + off + zlen > len(payload) or raw > max_raw:
        raise TransportError("a section lies outside the payload or is too large")
    try:
        return decompress_section(payload[base + off:base + off + zlen], raw, lc, lp, pb, d)
    except (lzma.LZMAError, EOFError) as e:
        raise TransportError("a section of the tasks payload is damaged (%s)" % e) from None


def magnitude_order(data):
    """Positions of the bytes of ``data`` by decreasing |int8 value| (stable)."""
    mags = np.abs(np.frombuffer(data, dtype=np.int8).astype(np.int16))
    return np.argsort(-mags, kind="stable")


def apply_scaled(predicted, scaled):
    """``predicted`` (a model file's bytes as a uint8 array, changed in place) with each
    ``[start, count, ratio]`` of ``scaled`` applied: the ``count`` float32 words from byte ``start``
    times ``ratio`` (in float32). A task file's quantization scales that follow an activation scale
    (a bias's per-channel scales are ``input scale x weight scale``) are the base's times one ratio,
    so predicting them leaves a residual of zeros and last-bit differences instead of random bytes.
    TransportError when ``scaled`` is malformed or lies outside the file."""
    if not isinstance(scaled, list) or len(scaled) > 4096:
        raise TransportError("a bitmask file's scaled words are malformed")
    words = predicted[:len(predicted) // 4 * 4].view("<f4")
    for item in scaled:
        if not (isinstance(item, list) and len(item) == 3 and all(mask_codec.is_int(v) for v in item[:2])
                and isinstance(item[2], float) and np.isfinite(item[2]) and item[0] % 4 == 0
                and item[1] > 0 and 0 <= item[0] and item[0] + 4 * item[1] <= len(words) * 4):
            raise TransportError("a bitmask file's scaled words are malformed")
        first = item[0] // 4
        with np.errstate(all="ignore"):
            words[first:first + item[1]] = words[first:first + item[1]] * np.float32(item[2])
    return predicted


def header_filters():
    return [{"id": lzma.FILTER_LZMA2, "lc": 3, "lp": 0, "pb": 0, "dict_size": 1 << 16}]


def region_positions(regions, size):
    """The byte positions inside ``regions`` ([start, end) pairs, sorted, disjoint, within ``size``)."""
    if not isinstance(regions, list) or len(regions) > (1 << 20):
        raise TransportError("the tasks payload's regions are malformed")
    parts, last = [], 0
    for r in regions:
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                and last <= r[0] < r[1] <= size):
            raise TransportError("the tasks payload's regions are malformed")
        parts.append(np.arange(r[0], r[1], dtype=np.int64))
        last = r[1]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _check_file_entries(entries, sizes):
    """The payload's file entries, checked before anything is decoded: at most MAX_TASKS, and with
    ``sizes`` ({file name: bytes the manifest records}) each a file of the recorded size, so the
    files decoded take no more than the bundle's own files."""
    if len(entries) > MAX_TASKS:
        raise TransportError("the tasks payload lists more than %d files" % MAX_TASKS)
    names = [f.get("file") if isinstance(f, dict) else None for f in entries]
    if len(set(map(str, names))) != len(names):
        raise TransportError("the tasks payload lists a file twice")
    for f in entries:
        if not isinstance(f, dict) or not isinstance(f.get("file"), str) or not isinstance(f.get("bytes"), int) \
                or isinstance(f["bytes"], bool) or f["bytes"] < 0:
            raise TransportError("a file entry of the tasks payload is malformed")
        if sizes is not None and sizes.get(f["file"]) != f["bytes"]:
            raise TransportError("%s is not a file of this bundle of %d bytes" % (f["file"][:80], f["bytes"]))


def decode_task_models(payload, base, sizes=None):
    """``{file name: bytes}`` of every model file in a tasks payload, given the base model file's bytes.
    Raises TransportError when the payload is damaged or does not match ``base``. ``sizes``: see
    ``_check_file_entries`` (verify passes the manifest's file table)."""
    payload = bytes(payload)
    if len(payload) < _HEAD.size or payload[:8] != TASKS_MAGIC:
        raise TransportError("not a tasks transport payload (or one of another version)")
    _magic, zlen, hlen = _HEAD.unpack_from(payload)
    if hlen > MAX_HEADER or _HEAD.size + zlen > len(payload):
        raise TransportError("the tasks payload header is damaged")
    try:
        d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=header_filters())
        raw = d.decompress(payload[_HEAD.size:_HEAD.size + zlen], max_length=hlen + 1)
        if len(raw) != hlen:
            raise ValueError("length")
        header = json.loads(raw.decode("utf-8"))
    except (lzma.LZMAError, UnicodeDecodeError, ValueError):
        raise TransportError("the tasks payload header is damaged") from None
    if not isinstance(header, dict) or header.get("version") != 2 or not isinstance(header.get("files"), list):
        raise TransportError("the tasks payload has an unknown version")
    _check_file_entries(header["files"], sizes)
    start = _HEAD.size + zlen
    b = header.get("base") or {}
    if b.get("bytes") != len(base) or b.get("sha256") != hashlib.sha256(base).hexdigest():
        raise TransportError("the tasks payload was made for another %s" % b.get("file"))
    base_arr = np.frombuffer(base, dtype=np.uint8)
    levels = residuals = bitmasks = None
    out = {}
    for f in header["files"]:
        if f.get("mode") == "full":
            body = _section(payload, start, f.get("data"), f["bytes"])
        elif f.get("mode") == "masked":
            level = f.get("level")
            if f["bytes"] != len(base) or not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 255:
                raise TransportError("a masked file entry is malformed")
            if levels is None:
                positions = region_positions(header.get("regions"), len(base))
                coded = np.frombuffer(_section(payload, start, header.get("levels"), len(positions)), dtype=np.uint8)
                if len(coded) != len(positions):
                    raise TransportError("the level map has the wrong length")
                levels = np.ones(len(base), dtype=np.uint8)
                levels[positions[magnitude_order(base_arr[positions].tobytes())]] = coded
                n = sum(1 for e in header["files"] if isinstance(e, dict) and e.get("mode") == "masked")
                residuals = np.frombuffer(_section(payload, start, header.get("residuals"), n * len(base)), dtype=np.uint8)
            if len(residuals) < level * len(base):
                raise TransportError("the residuals are too short")
            masked = np.where(levels <= level, base_arr, 0).astype(np.uint8)
            body = (masked + residuals[(level - 1) * len(base):level * len(base)]).astype(np.uint8).tobytes()
        elif f.get("mode") == "bitmask":
            if bitmasks is None:
                bitmasks = _BitmaskSections(header, payload, start, base_arr)
            body = bitmasks.file(f)
        else:
            raise TransportError("a file entry has an unknown mode")
        if len(body) != f["bytes"] or hashlib.sha256(body).hexdigest() != f.get("sha256"):
            raise TransportError("%s does not decode to its recorded sha256" % f["file"])
        out[f["file"]] = body
    return out


class _BitmaskSections(object):
    """Piggyback's ``bitmask`` files: each keeps the base's bytes where its mask (one bit per byte
    of the base inside ``regions``) is set, decoded from its coded flips (``mask_codec``) against
    all ones or the previous ``bitmask`` file's mask, plus its slice of ``bit_residuals``."""

    def __init__(self, header, payload, start, base_arr):
        n = sum(1 for e in header["files"] if isinstance(e, dict) and e.get("mode") == "bitmask")
        self.positions = region_positions(header.get("regions"), len(base_arr))
        self.residuals = _section(payload, start, header.get("bit_residuals"), n * len(base_arr))
        if len(self.residuals) != n * len(base_arr):
            raise TransportError("the bit mask residuals have the wrong length")
        self.count, self.base, self.payload, self.start = n, base_arr, payload, start
        self.previous = None
        self._orders = {}

    def _order(self, order):
        if not isinstance(order, str):  # a dict key below; position_order checks the name
            raise TransportError("a bitmask file entry is malformed")
        if order not in self._orders:
            self._orders[order] = mask_codec.position_order(order, self.base[self.positions].tobytes())
        return self._orders[order]

    def file(self, entry):
        i, size, ref = entry.get("index"), len(self.base), entry.get("ref")
        if entry["bytes"] != size or not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.count \
                or ref not in ("ones", "previous") or (ref == "previous" and self.previous is None):
            raise TransportError("a bitmask file entry is malformed")
        coding, count, length = entry.get("coding"), entry.get("flip_count"), len(self.positions)
        perm = self._order(entry.get("order", "region"))
        coded = _section(self.payload, self.start, entry.get("flips"), mask_codec.max_coded_bytes(coding, count, length))
        flips = np.empty(length, dtype=bool)
        flips[perm] = mask_codec.decode(coded, coding, count, length)
        kept = ~flips if ref == "ones" else self.previous ^ flips
        self.previous = kept
        keep = np.ones(size, dtype=bool)
        keep[self.positions] = kept
        residual = np.frombuffer(self.residuals[i * size:(i + 1) * size], dtype=np.uint8)
        predicted = apply_scaled(np.where(keep, self.base, 0).astype(np.uint8), entry.get("scaled", []))
        return (predicted + residual).astype(np.uint8).tobytes()


def check_tasks_transport(bundle):
    """A verify check: ``tasks_transport`` rebuilds each task's model file byte for byte (None when
    the bundle has no tasks payload)."""
    from .integrity import FileRefused, read_bundle_file
    tt = bundle.manifest.get("tasks_transport")
    if not tt:
        return None
    if not isinstance(tt, dict) or not isinstance(tt.get("file"), str):
        return _check("tasks transport", False, "manifest.json: tasks_transport is malformed")
    listed = {f.get("name"): f for f in bundle.files if isinstance(f, dict)}
    name = tt["file"]
    if name not in listed:
        return _check("tasks transport", False, "%s is not listed in files" % name)
    try:
        payload = read_bundle_file(bundle.path, name, listed[name]["bytes"], "tasks_transport.file")
        base = read_bundle_file(bundle.path, bundle.model_file, listed[bundle.model_file]["bytes"], "model_file")
        files = decode_task_models(payload, base, {n: e["bytes"] for n, e in listed.items()})
        for fname, body in files.items():
            if fname not in listed:
                raise TransportError("%s is not a file of this bundle" % fname)
            disk = read_bundle_file(bundle.path, fname, listed[fname]["bytes"], "task model_file")
            if disk != body:
                raise TransportError("%s does not decode to the bundle's %s" % (name, fname))
    except FileRefused as e:
        return _check("tasks transport", False, "%s cannot be read: %s" % (e.name, e.problem))
    except (OSError, TransportError, KeyError) as e:
        return _check("tasks transport", False, str(e))
    total = listed[name]["bytes"]
    return _check("tasks transport", True, "%s (%d bytes) + %s's payload rebuild %s exactly" % (
        name, total, bundle.model_file, ", ".join(sorted(files))))


__all__ = ["TASKS_MAGIC", "TaskModel", "bundle_tasks", "check_tasks_transport", "decode_task_models",
           "apply_scaled", "header_filters", "magnitude_order", "open_full_task_model", "open_task_model", "region_positions",
           "select_task", "task_accuracies", "task_labels", "verify_tasks"]
