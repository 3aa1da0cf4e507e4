"""Bundle loading: manifest.json schema checks and the ``Bundle`` object."""

import json
import os

import numpy as np

from .errors import ManifestError, ModelLoadError, NotABundleError, SchemaTooNewError
from .integrity import check_files, require_intact, safe_join
from .runtimes import RUNTIMES, normalize_settings, open_model, version_tuple

MANIFEST_NAME = "manifest.json"
SUPPORTED_SCHEMA_VERSION = 1
TEST_VECTORS_NAME = "test_vectors.npz"
EVAL_NAME = "eval.npz"
LABELS_NAME = "labels.txt"

_REEXPORT = "re-export the bundle with edgec export"


def _require(m, dotted, types, what=None):
    cur = m
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise ManifestError("manifest.json: missing %r" % dotted, _REEXPORT)
        cur = cur[part]
    if types is not None and not isinstance(cur, types):
        raise ManifestError("manifest.json: %r should be %s, got %s" % (dotted, what or types,
                                                                         type(cur).__name__), _REEXPORT)
    return cur


def validate_manifest(m):
    """Check the parts of the schema the runner relies on; raise ManifestError naming the key."""
    if not isinstance(m, dict):
        raise ManifestError("manifest.json is not a JSON object", _REEXPORT)
    if "schema_version" not in m:
        raise ManifestError("manifest.json has no schema_version: not an edgec bundle manifest", _REEXPORT)
    sv = m["schema_version"]
    if isinstance(sv, bool) or not isinstance(sv, int) or sv < 1:
        raise ManifestError("manifest.json: schema_version must be a positive integer, got %r" % (sv,),
                            _REEXPORT)
    if sv > SUPPORTED_SCHEMA_VERSION:
        raise SchemaTooNewError(
            "bundle manifest schema_version %d is newer than this runner supports (%d)"
            % (sv, SUPPORTED_SCHEMA_VERSION),
            "upgrade edgec (pip install -U edgec), or use the run.py shipped inside the bundle")
    name = _require(m, "runtime.name", str, "a string")
    if name not in RUNTIMES:
        raise ManifestError("manifest.json: runtime.name %r is not one of %s" % (name, ", ".join(RUNTIMES)),
                            "upgrade edgec if the bundle was made by a newer version")
    _require(m, "model_file", str, "a string")
    files = _require(m, "files", list, "a list")
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not {"name", "bytes", "sha256"} <= set(f):
            raise ManifestError("manifest.json: files[%d] needs name, bytes and sha256" % i, _REEXPORT)
    if m["model_file"] not in [f["name"] for f in files]:
        raise ManifestError("manifest.json: model_file %r is not listed in files" % m["model_file"], _REEXPORT)
    for key in ("inputs", "outputs"):
        lst = _require(m, key, list, "a list")
        if not lst or not isinstance(lst[0], dict) or not isinstance(lst[0].get("shape"), list):
            raise ManifestError("manifest.json: %s[0].shape is missing" % key, _REEXPORT)
    _require(m, "preprocessing", dict, "an object")
    atol = _require(m, "tolerance.atol", (int, float), "a number")
    if isinstance(atol, bool) or atol < 0:
        raise ManifestError("manifest.json: tolerance.atol must be >= 0", _REEXPORT)
    return m


def load_manifest(path):
    """Read and validate ``<bundle>/manifest.json`` (``path`` may be the bundle or the file)."""
    mpath = path if os.path.basename(path) == MANIFEST_NAME and os.path.isfile(path) \
        else os.path.join(path, MANIFEST_NAME)
    if not os.path.exists(os.path.dirname(mpath) or "."):
        raise NotABundleError("%s does not exist" % os.path.dirname(mpath),
                              "pass the bundle folder <out>/<target>/bundle written by edgec build")
    if not os.path.isfile(mpath):
        where = os.path.dirname(mpath) or "."
        if not os.path.isdir(where):
            raise NotABundleError("%s is not a directory" % where,
                                  "pass the bundle folder <out>/<target>/bundle written by edgec build")
        raise NotABundleError("%s is not an edgec bundle (no manifest.json)" % where,
                              "pass the bundle folder <out>/<target>/bundle written by edgec build")
    try:
        with open(mpath, "rb") as f:
            raw = f.read()
        m = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError("manifest.json is not valid UTF-8 (byte %d)" % e.start,
                            "the file is corrupt; copy the bundle again") from e
    except ValueError as e:
        raise ManifestError("manifest.json is not valid JSON (%s)" % str(e).splitlines()[0],
                            "the file is corrupt; copy the bundle again") from e
    return validate_manifest(m)


class Bundle:
    """A loaded bundle.

    Attributes: ``path`` (absolute dir), ``manifest`` (dict), ``runtime_name``,
    ``model_file``, ``model_path``, ``schema_version``.
    """

    def __init__(self, path, manifest):
        self.path = os.path.abspath(path)
        self.manifest = manifest
        self.schema_version = manifest["schema_version"]
        self.runtime_name = manifest["runtime"]["name"]
        self.model_file = manifest["model_file"]
        self.model_path = safe_join(self.path, self.model_file)

    def __repr__(self):
        return "Bundle(%r, runtime=%r, model=%r)" % (self.path, self.runtime_name, self.model_file)

    # --- manifest views ------------------------------------------------------------------------
    @property
    def files(self):
        return self.manifest["files"]

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
    def atol(self):
        return float(self.manifest["tolerance"]["atol"])

    @property
    def recommended_settings(self):
        """``runtime.recommended`` normalized (unknown keys ignored); {} when absent."""
        rec = (self.manifest.get("runtime") or {}).get("recommended") or {}
        if not isinstance(rec, dict) or not rec:
            return {}
        return normalize_settings(self.runtime_name, rec, strict=False)

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
            for p in v or []:
                if isinstance(p, str) and p not in out:
                    out.append(p)
        return out

    def labels(self):
        lab = self.manifest.get("labels")
        if isinstance(lab, list) and lab:
            return [str(x) for x in lab]
        p = os.path.join(self.path, LABELS_NAME)
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f if line.strip()]
        return []

    def file_path(self, name):
        return safe_join(self.path, name)

    # --- checks and data -----------------------------------------------------------------------
    def check_integrity(self):
        """``integrity.check_files`` report for this bundle (does not raise on bad files)."""
        return check_files(self.path, self.files)

    def require_intact(self):
        """Raise IntegrityError when any listed file is missing or differs."""
        return require_intact(self.path, self.files)

    def _npz(self, name, keys):
        p = self.file_path(name)
        if not os.path.isfile(p):
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [k for k in keys if k not in z.files]
                if missing:
                    raise ManifestError("%s has no %s array" % (name, ", ".join(repr(k) for k in missing)),
                                        _REEXPORT)
                return {k: z[k] for k in z.files}
        except ManifestError:
            raise
        except Exception as e:
            raise ManifestError("%s cannot be read: %s" % (name, str(e).splitlines()[0] if str(e) else e),
                                "the file is corrupt; copy the bundle again") from e

    def test_vectors(self):
        """``{"inputs", "expected", ["reference"]}`` arrays from test_vectors.npz, or None when absent."""
        return self._npz(TEST_VECTORS_NAME, ("inputs", "expected"))

    def eval_set(self):
        """``(x_raw, y)`` from eval.npz, or None when absent."""
        z = self._npz(EVAL_NAME, ("x", "y"))
        if z is None:
            return None
        return z["x"], z["y"].astype(np.int64)

    def open_model(self, settings=None, runtime=None):
        """Open the model with ``runtime.recommended`` overlaid by ``settings``; the returned
        Model's ``predict_raw`` applies this bundle's preprocessing.

        ``runtime`` forces a package (ai-edge-litert | tflite-runtime | onnxruntime)."""
        s = dict(self.recommended_settings)
        s.update(normalize_settings(self.runtime_name, settings, strict=True) if settings else {})
        s = {k: v for k, v in s.items() if k != "providers"}
        model = open_model(self.model_path, self.runtime_name, s, package=runtime,
                           io_meta={"input": self.input_meta, "output": self.output_meta})
        model.preprocessing = self.preprocessing
        model.input_layout = self.input_meta.get("layout")
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
        """A note when the installed runtime is older than runtime.min_version (None otherwise)."""
        rt = self.manifest.get("runtime") or {}
        want = rt.get("min_version")
        pkgs = [str(p).split("=")[0].split("<")[0].split(">")[0].strip().lower() for p in rt.get("packages") or []]
        if not want or (pkgs and runtime_info.package not in pkgs[:1]):
            return None
        if version_tuple(runtime_info.version) < version_tuple(want):
            return ("%s %s is older than the bundle's runtime.min_version %s (hint: pip install -U %s)"
                    % (runtime_info.package, runtime_info.version, want, runtime_info.package))
        return None


def load_bundle(path):
    """Load and validate a bundle directory (or its manifest.json). Raises BundleError subclasses."""
    path = os.fspath(path)
    if os.path.basename(path) == MANIFEST_NAME and os.path.isfile(path):
        root = os.path.dirname(os.path.abspath(path))
    else:
        root = path
    return Bundle(root, load_manifest(root))
