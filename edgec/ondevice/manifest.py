"""Bundle loading: manifest.json schema checks and the ``Bundle`` object.

Everything the runner reads from manifest.json is checked for type and range first
(``validate_manifest``), so a malformed field is one ManifestError naming it (exit 2), never a
traceback. File names from the manifest are confined to the bundle (``integrity.check_name``);
files are read bounded (``integrity.open_bundle_file``, ``load_npz``).
"""

import json
import math
import os
import re
import zipfile

import numpy as np

from . import runtime_onnx, runtime_tflite
from .errors import ManifestError, ModelLoadError, NotABundleError, SchemaTooNewError, SettingsError
from .integrity import (MANIFEST_NAME, PYCACHE, UNLISTED_OK, FileRefused, check_files, check_name,
                        open_bundle_file, read_bundle_file, require_intact, safe_join)
from .manifest_seal import check_seal
from .metrics import TASKS
from .recommend import machine_recommendation
from .runtime_base import MAX_THREADS
from .runtimes import RUNTIMES, import_runtime, normalize_settings, open_model, version_tuple

SUPPORTED_SCHEMA_VERSION = 1
TEST_VECTORS_NAME = "test_vectors.npz"
EVAL_NAME = "eval.npz"
LABELS_NAME = "labels.txt"

# Bounds on what is read or allocated from a bundle.
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILES = 100_000
MAX_FILE_BYTES = 1 << 40
MAX_DIM = 1 << 24
MAX_SAMPLE_ELEMENTS = 1 << 28
MAX_RANK = 8
MAX_TENSORS = 64
MAX_PARAM_VALUES = 1 << 16
MAX_LABELS = 1 << 20
MAX_LABELS_BYTES = 16 << 20
TEST_VECTORS_MAX_BYTES = 256 << 20  # decompressed arrays of test_vectors.npz
EVAL_MAX_BYTES = 1 << 30  # decompressed arrays of eval.npz
MAX_NPZ_MEMBERS = 64
MAX_INT8_STEPS = 255  # tolerance.runtimes.*.int8_steps: the width of the int8 range
RUNTIME_PACKAGES = runtime_tflite.PACKAGES + runtime_onnx.PACKAGES
MAX_FLOAT_OPS = 256  # mixed_precision.float_ops: the layers an int8 model keeps in float
LAYER_NAME = re.compile(r"[A-Za-z0-9_./:-]{1,200}")  # a torch module path or an ONNX node name
NUMERIC_DTYPES = ("float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                  "int64", "uint64", "bool")

_REEXPORT = "re-export the bundle with edgec export"


def _bad(key, what, value):
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ManifestError("manifest.json: %s should be %s, got %s" % (key, what, shown), _REEXPORT)


def _get(m, dotted):
    cur = m
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None, False
        cur = cur[part]
    return cur, True


def _require(m, dotted, types, what=None):
    cur, found = _get(m, dotted)
    if not found:
        raise ManifestError("manifest.json: missing %r" % dotted, _REEXPORT)
    if types is not None and (not isinstance(cur, types) or isinstance(cur, bool) and bool not in _tuple(types)):
        raise ManifestError("manifest.json: %r should be %s, got %s" % (dotted, what or types,
                                                                         type(cur).__name__), _REEXPORT)
    return cur


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _opt(m, dotted, check, what, prefix=""):
    """An optional key: absent or null is fine, else ``check(value)`` must hold."""
    v, found = _get(m, dotted)
    if found and v is not None and not check(v):
        raise _bad(prefix + dotted, what, v)
    return v if found else None


def _check_dims(key, dims, dynamic_ok):
    if not isinstance(dims, list) or not 1 <= len(dims) <= MAX_RANK:
        raise _bad(key, "a list of 1 to %d dimensions" % MAX_RANK, dims)
    fixed = 1
    for j, d in enumerate(dims):
        if dynamic_ok and (d is None or d == -1 and _is_int(d)):
            continue
        if not _is_int(d) or not 1 <= d <= MAX_DIM:
            raise _bad("%s[%d]" % (key, j), "a positive integer up to %d%s" % (
                MAX_DIM, " (or -1/null for a dynamic dimension)" if dynamic_ok else ""), d)
        if j > 0 or not dynamic_ok:
            fixed *= d
    if fixed > MAX_SAMPLE_ELEMENTS:
        raise _bad(key, "at most %d elements per sample" % MAX_SAMPLE_ELEMENTS, dims)


def _is_param(v, positive=False):
    """A number, or a non-empty list of numbers (per channel)."""
    vals = v if isinstance(v, list) else [v]
    if not vals or len(vals) > MAX_PARAM_VALUES:
        return False
    return all(_is_num(x) and (x > 0 if positive else True) for x in vals)


def _is_int_param(v):
    vals = v if isinstance(v, list) else [v]
    return bool(vals) and len(vals) <= MAX_PARAM_VALUES and all(_is_int(x) and -2**31 <= x < 2**31 for x in vals)


def _check_tensors(m, key):
    lst = _require(m, key, list, "a list")
    if not lst or len(lst) > MAX_TENSORS:
        raise ManifestError("manifest.json: %s[0].shape is missing" % key if not lst else
                            "manifest.json: %s lists %d tensors (at most %d)" % (key, len(lst), MAX_TENSORS),
                            _REEXPORT)
    for i, t in enumerate(lst):
        where = "%s[%d]" % (key, i)
        if not isinstance(t, dict):
            raise _bad(where, "an object", t)
        if not isinstance(t.get("shape"), list):
            raise ManifestError("manifest.json: %s.shape is missing" % where, _REEXPORT)
        _check_dims(where + ".shape", t["shape"], dynamic_ok=True)
        _opt(t, "name", lambda v: isinstance(v, str) and len(v) <= 1024, "a string", where + ".")
        _opt(t, "dtype", lambda v: v in NUMERIC_DTYPES, "one of " + ", ".join(NUMERIC_DTYPES), where + ".")
        _opt(t, "layout", lambda v: isinstance(v, str) and v.isalpha() and len(v) <= MAX_RANK,
             "a layout such as NCHW", where + ".")
        q = t.get("quantization")
        if q is not None:
            if not isinstance(q, dict):
                raise _bad(where + ".quantization", "an object with scale and zero_point, or null", q)
            if q.get("scale") is not None and not _is_param(q["scale"], positive=True):
                raise _bad(where + ".quantization.scale", "a positive number (or a list of them)", q["scale"])
            if q.get("zero_point") is not None and not _is_int_param(q["zero_point"]):
                raise _bad(where + ".quantization.zero_point", "an integer (or a list of them)", q["zero_point"])


def _listed(names, key, value):
    check_name(value, key)
    if value not in names:
        raise ManifestError("manifest.json: %s %r is not listed in files" % (key, value), _REEXPORT)


def validate_manifest(m):
    """Check the manifest's self-digest (``manifest_seal``), then every part of the schema the runner
    relies on, for type and range; raise ManifestError (one line, naming the key) otherwise. Returns ``m``."""
    if not isinstance(m, dict):
        raise ManifestError("manifest.json is not a JSON object", _REEXPORT)
    if "schema_version" not in m:
        raise ManifestError("manifest.json has no schema_version: not an edgec bundle manifest", _REEXPORT)
    sv = m["schema_version"]
    if not _is_int(sv) or sv < 1:
        raise ManifestError("manifest.json: schema_version must be a positive integer, got %r" % (sv,),
                            _REEXPORT)
    if sv > SUPPORTED_SCHEMA_VERSION:
        raise SchemaTooNewError(
            "bundle manifest schema_version %d is newer than this runner supports (%d)"
            % (sv, SUPPORTED_SCHEMA_VERSION),
            "upgrade edgec (pip install -U edgec), or use the run.py shipped inside the bundle")
    check_seal(m)  # before any other field is read: a changed byte anywhere is caught here
    _validate_runtime(m)
    _validate_files(m)
    _validate_tensors(m)
    _validate_metrics(m)
    _validate_mixed_precision(m)
    _validate_task(m)
    if "tasks" in m:  # a multi-task bundle (learn stages): tasks.py checks its tasks section
        from .tasks import bundle_tasks  # only then: tasks.py requires lzma, a single-task bundle does not
        bundle_tasks(m)
    return m


def _validate_runtime(m):
    _require(m, "runtime", dict, "an object")
    name = _require(m, "runtime.name", str, "a string")
    if name not in RUNTIMES:
        raise ManifestError("manifest.json: runtime.name %r is not one of %s" % (name[:40], ", ".join(RUNTIMES)),
                            "upgrade edgec if the bundle was made by a newer version")
    _opt(m, "runtime.packages", lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
         "a list of strings")
    _opt(m, "runtime.min_version", lambda v: isinstance(v, str) and len(v) <= 64, "a version string")  # older bundles; not used
    _opt(m, "runtime.min_versions", lambda v: isinstance(v, dict) and len(v) <= 16 and all(
        isinstance(k, str) and len(k) <= 64 and isinstance(x, str) and len(x) <= 64 for k, x in v.items()),
         "an object of pip package -> version string")
    _opt(m, "runtime.providers", lambda v: isinstance(v, str) or isinstance(v, list)
         and all(isinstance(p, str) for p in v), "a list of provider names")
    rec = _opt(m, "runtime.recommended", lambda v: isinstance(v, dict), "an object")
    if rec:
        try:
            normalize_settings(name, rec, strict=True)
        except SettingsError as e:
            raise ManifestError("manifest.json: runtime.recommended: %s" % e.message, _REEXPORT) from None


def _validate_files(m):
    """The file table (names inside the bundle, each once, sizes and digests in range) and the files named
    elsewhere that it must list."""
    files = _require(m, "files", list, "a list")
    if len(files) > MAX_FILES:
        raise ManifestError("manifest.json: files lists %d entries (at most %d)" % (len(files), MAX_FILES), _REEXPORT)
    names = set()
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not {"name", "bytes", "sha256"} <= set(f):
            raise ManifestError("manifest.json: files[%d] needs name, bytes and sha256" % i, _REEXPORT)
        fname = check_name(f["name"], "files[%d].name" % i)
        if fname in names:
            raise ManifestError("manifest.json: files lists %r twice" % fname, _REEXPORT)
        if fname in UNLISTED_OK or PYCACHE in fname.split("/"):
            raise ManifestError("manifest.json: files[%d] lists %r, which a bundle never lists" % (i, fname),
                                _REEXPORT)
        names.add(fname)
        if not _is_int(f["bytes"]) or not 0 <= f["bytes"] <= MAX_FILE_BYTES:
            raise _bad("files[%d].bytes" % i, "a byte count", f["bytes"])
        sha = f["sha256"]
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower()):
            raise _bad("files[%d].sha256" % i, "64 hex digits", sha)
    _listed(names, "model_file", _require(m, "model_file", str, "a string"))
    extra = _opt(m, "extra_model_files", lambda v: isinstance(v, list), "a list of file names")
    for i, e in enumerate(extra or []):
        _listed(names, "extra_model_files[%d]" % i, e)
    transport = _opt(m, "size.transport_file", lambda v: isinstance(v, str), "a file name")
    if transport is not None:
        _listed(names, "size.transport_file", transport)
    _opt(m, "size", lambda v: isinstance(v, dict), "an object")
    for key in ("model_bytes", "transport_bytes", "reference_fp32_bytes"):
        _opt(m, "size." + key, lambda v: _is_int(v) and v >= 0, "a byte count")


def _validate_tensors(m):
    """``inputs``, ``outputs`` and ``preprocessing``."""
    _check_tensors(m, "inputs")
    _check_tensors(m, "outputs")
    _require(m, "preprocessing", dict, "an object")
    _opt(m, "preprocessing.raw_dtype", lambda v: v in NUMERIC_DTYPES, "one of " + ", ".join(NUMERIC_DTYPES))
    raw_shape = _opt(m, "preprocessing.raw_shape", lambda v: isinstance(v, list), "a list of dimensions")
    if raw_shape:
        _check_dims("preprocessing.raw_shape", raw_shape, dynamic_ok=False)
    _opt(m, "preprocessing.scale", _is_param, "a number (or a list of them)")
    _opt(m, "preprocessing.offset", _is_param, "a number (or a list of them)")
    _opt(m, "preprocessing.layout", lambda v: isinstance(v, str) and v.isalpha() and len(v) <= MAX_RANK,
         "a layout such as NCHW")


def _validate_metrics(m):
    """The rest the runner reads: labels, target, metrics, tolerance."""
    _opt(m, "labels", lambda v: isinstance(v, list) and len(v) <= MAX_LABELS
         and all(isinstance(x, str) or _is_num(x) for x in v), "a list of class names")
    _opt(m, "target", lambda v: isinstance(v, dict), "an object")
    _opt(m, "target.name", lambda v: isinstance(v, str), "a string")
    _opt(m, "target.profile", lambda v: isinstance(v, dict), "an object")
    _opt(m, "metrics", lambda v: isinstance(v, dict), "an object")
    for key in ("accuracy", "reference_accuracy", "top1_agreement", "eval_accuracy"):
        _opt(m, "metrics." + key, lambda v: _is_num(v) and 0 <= v <= 1, "a fraction between 0 and 1")
    _opt(m, "metrics.max_abs_diff", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    for key in ("eval_samples", "test_samples"):
        _opt(m, "metrics." + key, lambda v: _is_int(v) and v >= 0, "a count")
    atol = _require(m, "tolerance.atol", (int, float), "a number")
    if not _is_num(atol) or atol < 0:
        raise ManifestError("manifest.json: tolerance.atol must be >= 0", _REEXPORT)
    _opt(m, "tolerance.accuracy", lambda v: _is_num(v) and 0 <= v <= 1, "a fraction between 0 and 1")
    _validate_runtime_tolerances(m)


def _validate_runtime_tolerances(m):
    """``tolerance.runtimes``: per runtime package its int8 step allowance and atol (at most
    MAX_INT8_STEPS steps, the width of the int8 range)."""
    runtimes = _opt(m, "tolerance.runtimes", lambda v: isinstance(v, dict) and len(v) <= len(RUNTIME_PACKAGES),
                    "an object keyed by runtime package")
    for package, entry in (runtimes or {}).items():
        if package not in RUNTIME_PACKAGES:
            raise _bad("tolerance.runtimes", "keyed by " + ", ".join(RUNTIME_PACKAGES), package)
        where = "tolerance.runtimes.%s." % package
        if not isinstance(entry, dict):
            raise _bad(where[:-1], "an object with int8_steps and atol", entry)
        steps, atol = entry.get("int8_steps"), entry.get("atol")
        if not (_is_int(steps) and 0 <= steps <= MAX_INT8_STEPS):
            raise _bad(where + "int8_steps", "a whole number of steps from 0 to %d" % MAX_INT8_STEPS, steps)
        if not (_is_num(atol) and atol >= 0):
            raise _bad(where + "atol", "a number >= 0", atol)


def _validate_mixed_precision(m):
    """``mixed_precision`` (an int8 model with some layers kept in float): a bounded list of layer names."""
    if _opt(m, "mixed_precision", lambda v: isinstance(v, dict), "an object") is None:
        return
    if m.get("precision") != "int8":
        raise _bad("precision", "int8 when mixed_precision is present", m.get("precision"))
    _require(m, "mixed_precision.float_ops", list, "a list of layer names")
    for key in ("float_ops", "worst_layers"):
        _opt(m, "mixed_precision." + key, lambda v: isinstance(v, list) and len(v) <= MAX_FLOAT_OPS
             and all(isinstance(n, str) and LAYER_NAME.fullmatch(n) for n in v),
             "a list of at most %d layer names (letters, digits, _ . / : -)" % MAX_FLOAT_OPS)


def _validate_task(m):
    """``task`` (absent: classification), regression's ``postprocessing`` and the task figures verify reads."""
    task = _opt(m, "task", lambda v: v in TASKS, "one of " + ", ".join(TASKS))
    post = _opt(m, "postprocessing", lambda v: isinstance(v, dict), "an object with scale and offset")
    if post:
        _opt(m, "postprocessing.scale", lambda v: _is_param(v, positive=True), "a positive number (or a list of them)")
        _opt(m, "postprocessing.offset", _is_param, "a number (or a list of them)")
    for key in ("auc", "reference_auc", "eval_auc"):
        _opt(m, "metrics." + key, lambda v: _is_num(v) and 0 <= v <= 1, "a fraction between 0 and 1")
    for key in ("mse", "mae", "rmse", "eval_mse", "eval_mae", "eval_rmse", "relative_error"):
        _opt(m, "metrics." + key, lambda v: _is_num(v) and v >= 0, "a number >= 0")
    for key in ("r2", "eval_r2"):
        _opt(m, "metrics." + key, lambda v: _is_num(v) and v <= 1, "a number <= 1")
    _opt(m, "tolerance.metric", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    return task


def _reject_constant(name):
    raise ValueError("%s is not allowed in manifest.json" % name)


def parse_manifest(raw):
    """manifest.json bytes -> validated dict (ManifestError otherwise)."""
    try:
        m = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise ManifestError("manifest.json is not valid UTF-8 (byte %d)" % e.start,
                            "the file is corrupt; copy the bundle again") from e
    except (ValueError, RecursionError) as e:
        raise ManifestError("manifest.json is not valid JSON (%s)" % (str(e).splitlines() or ["nesting"])[0],
                            "the file is corrupt; copy the bundle again") from e
    return validate_manifest(m)


def bundle_root(path):
    """The bundle folder of ``path`` (the folder, or its manifest.json)."""
    path = os.fspath(path)
    if os.path.basename(path) == MANIFEST_NAME and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return path


def read_manifest_bytes(path):
    """The exact bytes of ``<bundle>/manifest.json`` (a regular file, not a symlink, bounded)."""
    root = bundle_root(path)
    hint = "pass the bundle folder <out>/<target>/bundle written by edgec build"
    if not os.path.exists(root):
        raise NotABundleError("%s does not exist" % root, hint)
    if not os.path.isdir(root):
        raise NotABundleError("%s is not a directory" % root, hint)
    try:
        return read_bundle_file(root, MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest")
    except FileNotFoundError:
        raise NotABundleError("%s is not an edgec bundle (no manifest.json)" % root, hint) from None
    except FileRefused as e:
        if e.problem == "too-big":
            raise ManifestError("manifest.json is bigger than %d bytes" % MAX_MANIFEST_BYTES,
                                "the file is corrupt; copy the bundle again") from None
        raise ManifestError("manifest.json is a %s, not a regular file" % (
            "symlink" if e.problem == "symlink" else "special file"),
            "a bundle holds regular files only; copy the bundle again") from None
    except OSError as e:
        raise ManifestError("manifest.json cannot be read (%s)" % (e.strerror or e), "check its permissions") from None


def load_manifest(path):
    """Read and validate ``<bundle>/manifest.json`` (``path`` may be the bundle or the file)."""
    return parse_manifest(read_manifest_bytes(path))


def _npz_header(fp):
    from numpy.lib import format as npformat
    version = npformat.read_magic(fp)
    if version == (1, 0):
        return npformat.read_array_header_1_0(fp)
    if version == (2, 0):
        return npformat.read_array_header_2_0(fp)
    private = getattr(npformat, "_read_array_header", None)
    if private is None:
        raise ValueError("unsupported .npy format version %s" % (version,))
    return private(fp, version)


def load_npz(f, name, max_bytes, keys=()):
    """Arrays of an .npz (an open binary file), allocating at most ``max_bytes`` in all: each
    member's header is read first and its size checked before its data is. Numeric dtypes only
    (no pickles, no objects). ManifestError naming ``name`` otherwise."""
    out, total = {}, 0
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ManifestError("%s cannot be read: not an .npz file (%s)" % (name, e),
                            "the file is corrupt; copy the bundle again") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_NPZ_MEMBERS:
            raise ManifestError("%s holds %d arrays (at most %d)" % (name, len(infos), MAX_NPZ_MEMBERS), _REEXPORT)
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise ManifestError("%s holds %r, which is not an array" % (name, info.filename[:80]), _REEXPORT)
            key = info.filename[:-4]
            try:
                with zf.open(info) as fp:
                    shape, fortran, dtype = _npz_header(fp)
                    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
                        raise ManifestError("%s: array %r has dtype %s (numeric arrays only)" % (name, key, dtype),
                                            _REEXPORT)
                    count = 1
                    for d in shape:
                        count *= int(d)
                    nbytes = count * dtype.itemsize
                    total += nbytes
                    if total > max_bytes:
                        raise ManifestError("%s: its arrays need more than %d bytes (array %r is %s %s)"
                                            % (name, max_bytes, key, list(shape), dtype), _REEXPORT)
                    data = fp.read(nbytes)
                    if len(data) != nbytes:
                        raise ManifestError("%s: array %r is truncated" % (name, key),
                                            "the file is corrupt; copy the bundle again")
                arr = np.frombuffer(bytearray(data), dtype=dtype)
                out[key] = arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)
            except ManifestError:
                raise
            except Exception as e:  # zlib, CRC, header syntax: one line, named
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ManifestError("%s cannot be read: %s" % (name, msg[:200]),
                                    "the file is corrupt; copy the bundle again") from None
    missing = [k for k in keys if k not in out]
    if missing:
        raise ManifestError("%s has no %s array" % (name, ", ".join(repr(k) for k in missing)), _REEXPORT)
    return out


class Bundle:
    """A loaded bundle.

    Attributes: ``path`` (absolute dir), ``manifest`` (dict), ``manifest_bytes`` (the exact bytes
    it was parsed from), ``runtime_name``, ``model_file``, ``model_path``, ``schema_version``.
    """

    def __init__(self, path, manifest, manifest_bytes=None):
        self.path = os.path.abspath(path)
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self.schema_version = manifest["schema_version"]
        self.runtime_name = manifest["runtime"]["name"]
        self.model_file = manifest["model_file"]
        self.model_path = safe_join(self.path, self.model_file, "model_file")

    def __repr__(self):
        return "Bundle(%r, runtime=%r, model=%r)" % (self.path, self.runtime_name, self.model_file)

    def with_model_file(self, model_file, outputs=None):
        """This bundle seen through another of its model files (a multi-task bundle's per-task model,
        ``tasks.py``), with that model's ``outputs`` when they differ."""
        manifest = dict(self.manifest, model_file=model_file)
        if outputs:
            manifest["outputs"] = outputs
        return Bundle(self.path, manifest, self.manifest_bytes)

    # --- manifest views ------------------------------------------------------------------------
    @property
    def files(self):
        return self.manifest["files"]

    def file_entry(self, name):
        for f in self.files:
            if f["name"] == name:
                return f
        return None

    @property
    def target_name(self):
        t = self.manifest.get("target") or {}
        return t.get("name") if isinstance(t, dict) else None

    @property
    def input_meta(self):
        return self.manifest["inputs"][0]

    @property
    def output_meta(self):
        return self.manifest["outputs"][0]

    @property
    def preprocessing(self):
        return self.manifest["preprocessing"]

    @property
    def task(self):
        """classification (manifests without ``task``), reconstruction or regression."""
        return self.manifest.get("task") or "classification"

    @property
    def atol(self):
        return float(self.manifest["tolerance"]["atol"])

    def atol_for(self, package):
        """The test-vector tolerance for runtime ``package`` (the pip name of the runtime loaded):
        its entry in ``tolerance.runtimes`` when the build measured one, else ``tolerance.atol``."""
        entry = (self.manifest["tolerance"].get("runtimes") or {}).get(package)
        return float(entry["atol"]) if entry else self.atol

    @property
    def recommended_settings(self):
        """The build-time default, ``runtime.recommended`` normalized; {} when absent. (This
        machine's measured setting, if bench stored one, is in recommended.json: see
        ``settings_for``.)"""
        rec = (self.manifest.get("runtime") or {}).get("recommended") or {}
        if not isinstance(rec, dict) or not rec:
            return {}
        return normalize_settings(self.runtime_name, rec, strict=False)

    def settings_for(self, runtime_info):
        """``(settings, notes)``: the settings this machine opens the model with by default: the
        manifest's ``runtime.recommended`` overlaid by recommended.json's entry for this machine
        and runtime (see ``recommend.py``), when there is a valid one."""
        base = dict(self.recommended_settings)
        mine, notes = machine_recommendation(self.path, self.runtime_name, runtime_info)
        if mine:
            base.update(mine)
        return base, notes

    @property
    def requested_providers(self):
        """ONNX execution providers the manifest asks for (runtime.recommended.provider,
        runtime.providers, target.profile.providers)."""
        out = []
        rt = self.manifest.get("runtime") or {}
        rec = rt.get("recommended") or {}
        prof = (self.manifest.get("target") or {}).get("profile") or {}
        for v in (rec.get("provider"), rt.get("providers"), prof.get("providers") if isinstance(prof, dict) else None):
            if isinstance(v, str):
                v = [v]
            for p in v if isinstance(v, list) else []:
                if isinstance(p, str) and p not in out:
                    out.append(p)
        return out

    def labels(self):
        lab = self.manifest.get("labels")
        if isinstance(lab, list) and lab:
            return [str(x) for x in lab]
        entry = self.file_entry(LABELS_NAME)
        limit = entry["bytes"] if entry else MAX_LABELS_BYTES
        try:
            data = read_bundle_file(self.path, LABELS_NAME, min(limit, MAX_LABELS_BYTES))
        except FileNotFoundError:
            return []
        except (FileRefused, OSError) as e:
            raise ManifestError("%s cannot be read (%s)" % (LABELS_NAME, e), "run verify to check the bundle") from None
        return [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]

    # --- checks and data -----------------------------------------------------------------------
    def check_integrity(self):
        """``integrity.check_files`` report for this bundle (does not raise on bad files)."""
        return check_files(self.path, self.files)

    def require_intact(self):
        """Raise IntegrityError when any listed file is missing or differs, or the bundle holds
        a file it does not list or a symlink."""
        return require_intact(self.path, self.files)

    def _npz(self, name, keys, max_bytes):
        entry = self.file_entry(name)
        try:
            f, _size = open_bundle_file(self.path, name, entry["bytes"] if entry else MAX_FILE_BYTES)
        except FileNotFoundError:
            return None
        except FileRefused as e:
            raise ManifestError("%s cannot be read: %s" % (name, e.problem),
                                "run verify to check the bundle") from None
        except OSError as e:
            raise ManifestError("%s cannot be read (%s)" % (name, e.strerror or e),
                                "check the bundle's permissions") from None
        with f:
            return load_npz(f, name, max_bytes, keys)

    def test_vectors(self):
        """``{"inputs", "expected", ["reference"]}`` arrays from test_vectors.npz, or None when absent."""
        z = self._npz(TEST_VECTORS_NAME, ("inputs", "expected"), TEST_VECTORS_MAX_BYTES)
        if z is None:
            return None
        if z["inputs"].ndim < 1 or z["expected"].ndim < 1 or len(z["inputs"]) != len(z["expected"]):
            raise ManifestError("%s: inputs and expected hold different numbers of vectors" % TEST_VECTORS_NAME,
                                _REEXPORT)
        return z

    def eval_set(self):
        """``(x_raw, y)`` from eval.npz, or None when absent."""
        z = self._npz(EVAL_NAME, ("x", "y"), EVAL_MAX_BYTES)
        if z is None:
            return None
        x, y = z["x"], z["y"]
        if self.task == "regression":  # float targets in real units, (N,) or (N, k)
            if x.ndim < 1 or y.ndim not in (1, 2) or len(x) != len(y) or y.dtype.kind not in "iuf":
                raise ManifestError("%s: y must hold the float target(s) of each sample of x" % EVAL_NAME, _REEXPORT)
            return x, y.astype(np.float64)
        if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or y.dtype.kind not in "iub":
            raise ManifestError("%s: y must be one integer label per sample of x" % EVAL_NAME, _REEXPORT)
        return x, y.astype(np.int64)

    def open_model(self, settings=None, runtime=None):
        """Open the model with this machine's default settings (``settings_for``) overlaid by
        ``settings``; the returned Model's ``predict_raw`` applies this bundle's preprocessing.

        ``runtime`` forces a package (ai-edge-litert | tflite-runtime | onnxruntime)."""
        explicit = normalize_settings(self.runtime_name, settings, strict=True) if settings else {}
        rt = import_runtime(self.runtime_name, runtime)
        s, notes = self.settings_for(rt)
        s.update(explicit)
        s = {k: v for k, v in s.items() if k != "providers"}
        model = open_model(self.model_path, self.runtime_name, s, package=rt.package,
                           io_meta={"input": self.input_meta, "output": self.output_meta})
        if not explicit or set(explicit) != set(s):
            model.notes.extend(notes)
        model.preprocessing = self.preprocessing
        model.input_layout = self.input_meta.get("layout")
        model.task, model.postprocessing = self.task, self.manifest.get("postprocessing")
        self._check_io(model)
        return model

    def _check_io(self, model):
        want = self.input_meta.get("shape") or []
        tail = [d for d in want[1:]]
        if all(isinstance(d, int) and d > 0 for d in tail) and tuple(tail) != tuple(model.sample_shape):
            raise ModelLoadError("model input shape %s differs from manifest inputs[0].shape %s"
                                 % (model.input_shape, want), _REEXPORT)
        q = self.input_meta.get("quantization")
        if model.input_quant and isinstance(q, dict) and q.get("scale"):
            scale = q["scale"][0] if isinstance(q["scale"], list) else q["scale"]
            if abs(float(scale) - model.input_quant[0]) > 1e-6 * max(1.0, abs(float(scale))):
                model.notes.append("manifest input scale %g differs from the model's %g; using the model's"
                                   % (float(scale), model.input_quant[0]))

    def runtime_min_version_note(self, runtime_info):
        """A note when the installed runtime package is older than the bundle's minimum for that package
        (``runtime.min_versions``; None otherwise). Each package has its own: ai-edge-litert 2.3 is
        newer than tflite-runtime 2.14."""
        want = ((self.manifest.get("runtime") or {}).get("min_versions") or {}).get(runtime_info.package)
        if not want:
            return None
        if version_tuple(runtime_info.version) < version_tuple(want):
            return ("%s %s is older than %s, the bundle's runtime.min_versions for it (hint: pip install -U %s)"
                    % (runtime_info.package, runtime_info.version, want, runtime_info.package))
        return None


def load_bundle(path, manifest_bytes=None):
    """Load and validate a bundle directory (or its manifest.json). Raises BundleError subclasses.

    ``manifest_bytes``: parse these bytes (already read, e.g. to check their signature first)
    instead of reading manifest.json again."""
    root = bundle_root(path)
    raw = read_manifest_bytes(root) if manifest_bytes is None else manifest_bytes
    return Bundle(root, parse_manifest(raw), raw)


__all__ = ["Bundle", "EVAL_NAME", "LABELS_NAME", "MANIFEST_NAME", "MAX_THREADS", "SUPPORTED_SCHEMA_VERSION",
           "TEST_VECTORS_NAME", "bundle_root", "load_bundle", "load_manifest", "load_npz", "parse_manifest",
           "read_manifest_bytes", "validate_manifest"]
