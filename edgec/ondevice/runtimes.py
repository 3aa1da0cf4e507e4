"""Open a bundle's model in its runtime and run it.

Runtimes are imported lazily, inside functions, so that importing this package
needs numpy only:

* TFLite: ``ai_edge_litert.interpreter`` (preferred), else ``tflite_runtime.interpreter``.
* ONNX: ``onnxruntime``.

Settings (a plain dict, what ``runtime.recommended`` in manifest.json holds):

* tflite: ``{"threads": int | None, "xnnpack": bool}``; ``xnnpack=False`` builds the
  interpreter with ``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``.
* onnxruntime: ``{"threads": int | None, "provider": "CPUExecutionProvider" | ...,
  "graph_optimization_level": "all" | "extended" | "basic" | "disable_all"}``.
  ``threads`` sets ``intra_op_num_threads`` (inter-op 1, sequential execution).
  A requested provider that this onnxruntime build lacks (CUDA, TensorRT, ...)
  falls back to CPUExecutionProvider with a note in ``Model.notes``.

``threads=None`` leaves the runtime's default.
"""

import importlib
import os
import time

import numpy as np

from .errors import ModelLoadError, RuntimeMissingError, SettingsError
from .preprocess import dequantize, is_quantized_dtype, preprocess_raw, quantize

RUNTIMES = ("tflite", "onnxruntime")

# (module, pip package) in order of preference
_TFLITE_MODULES = (
    ("ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime.interpreter", "tflite-runtime"),
)
_PACKAGE_ALIASES = {
    "ai-edge-litert": "ai-edge-litert", "ai_edge_litert": "ai-edge-litert", "litert": "ai-edge-litert",
    "tflite-runtime": "tflite-runtime", "tflite_runtime": "tflite-runtime",
    "onnxruntime": "onnxruntime", "ort": "onnxruntime",
    "onnxruntime-gpu": "onnxruntime", "onnxruntime_gpu": "onnxruntime",
}

GRAPH_OPT_LEVELS = ("all", "extended", "basic", "disable_all")
_GRAPH_OPT_ALIASES = {
    "all": "all", "ort_enable_all": "all", "enable_all": "all", "99": "all",
    "extended": "extended", "ort_enable_extended": "extended", "enable_extended": "extended", "2": "extended",
    "basic": "basic", "ort_enable_basic": "basic", "enable_basic": "basic", "1": "basic",
    "disable_all": "disable_all", "disable": "disable_all", "none": "disable_all", "off": "disable_all",
    "ort_disable_all": "disable_all", "0": "disable_all",
}
_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider", "rocm": "ROCMExecutionProvider", "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider", "directml": "DmlExecutionProvider", "openvino": "OpenVINOExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider", "nnapi": "NnapiExecutionProvider", "qnn": "QNNExecutionProvider",
}
# Accelerated providers a sweep tries when this onnxruntime build has them.
SWEEP_ACCELERATORS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                      "CoreMLExecutionProvider", "DmlExecutionProvider", "OpenVINOExecutionProvider")
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
           "tensor(int32)": np.int32, "tensor(int64)": np.int64}


class RuntimeInfo:
    """An imported runtime: ``name`` (tflite|onnxruntime), ``package`` (pip name), ``version``, ``module``."""

    def __init__(self, name, package, version, module):
        self.name, self.package, self.version, self.module = name, package, version, module

    def as_dict(self):
        return {"name": self.name, "package": self.package, "version": self.version}


def _version_of(module, package):
    for obj in (module, importlib.import_module(module.__name__.split(".")[0])):
        v = getattr(obj, "__version__", None)
        if v:
            return str(v)
    try:
        from importlib import metadata
        return metadata.version(package)
    except Exception:
        return "unknown"


def _missing(runtime_name, tried):
    if runtime_name == "tflite":
        return RuntimeMissingError(
            "no TFLite runtime is installed (tried %s)" % ", ".join(m for m, _ in tried),
            "pip install ai-edge-litert (or, on Raspberry Pi OS bookworm / Python 3.11, "
            "pip install tflite-runtime==2.14.0 'numpy<2'); see requirements.txt in the bundle")
    return RuntimeMissingError("onnxruntime is not installed",
                               "pip install onnxruntime (onnxruntime-gpu for CUDA/TensorRT); "
                               "see requirements.txt in the bundle")


def import_runtime(runtime_name, package=None):
    """Import the runtime for ``runtime_name`` ("tflite" | "onnxruntime").

    ``package`` forces one package ("ai-edge-litert", "tflite-runtime", "onnxruntime");
    None picks the first importable one. Raises RuntimeMissingError naming the pip package.
    """
    if runtime_name not in RUNTIMES:
        raise SettingsError("unknown runtime %r" % (runtime_name,), "use one of: " + ", ".join(RUNTIMES))
    if package is not None and package != "auto":
        pkg = _PACKAGE_ALIASES.get(str(package).lower())
        if pkg is None:
            raise SettingsError("unknown runtime package %r" % (package,),
                                "use ai-edge-litert or tflite-runtime (TFLite), onnxruntime (ONNX)")
        if (runtime_name == "onnxruntime") != (pkg == "onnxruntime"):
            raise SettingsError("runtime %r cannot run a %s bundle" % (package, runtime_name),
                                "leave --runtime out to use the bundle's runtime")
    else:
        pkg = None
    if runtime_name == "onnxruntime":
        tried = (("onnxruntime", "onnxruntime"),)
    else:
        tried = tuple(t for t in _TFLITE_MODULES if pkg is None or t[1] == pkg)
    for modname, pipname in tried:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        return RuntimeInfo(runtime_name, pipname, _version_of(mod, pipname), mod)
    raise _missing(runtime_name, tried)


def version_tuple(v):
    out = []
    for part in str(v).replace("-", ".").replace("+", ".").split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _as_threads(v, strict):
    if v is None or v == "default" or v == 0:
        return None
    try:
        t = int(v)
    except (TypeError, ValueError):
        if strict:
            raise SettingsError("threads must be a positive integer, got %r" % (v,), "e.g. --threads 2") from None
        return None
    if t < 1:
        if strict:
            raise SettingsError("threads must be >= 1, got %r" % (v,), "e.g. --threads 2")
        return None
    return t


def _as_bool(v):
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "on", "yes")
    return bool(v)


def provider_name(p):
    return _PROVIDER_ALIASES.get(str(p).lower(), str(p))


def normalize_settings(runtime_name, settings=None, strict=True):
    """Canonical settings dict for ``runtime_name`` (unknown keys: error when strict, else ignored)."""
    s = dict(settings or {})
    known = {"threads", "num_threads", "intra_op_num_threads", "xnnpack", "provider", "providers",
             "execution_provider", "graph_optimization_level", "graph_opt", "opt_level"}
    if strict:
        unknown = [k for k in s if k not in known]
        if unknown:
            raise SettingsError("unknown runtime setting(s): %s" % ", ".join(sorted(unknown)),
                                "known: threads, xnnpack (tflite), provider, graph_optimization_level (onnx)")
    threads = None
    for k in ("threads", "num_threads", "intra_op_num_threads"):
        if k in s:
            threads = _as_threads(s[k], strict)
            break
    if runtime_name == "tflite":
        return {"threads": threads, "xnnpack": _as_bool(s.get("xnnpack", True))}
    prov = s.get("provider", s.get("execution_provider"))
    if prov is None and s.get("providers"):
        provs = s["providers"]
        prov = provs[0] if isinstance(provs, (list, tuple)) else provs
    prov = provider_name(prov) if prov else "CPUExecutionProvider"
    lvl_raw = s.get("graph_optimization_level", s.get("graph_opt", s.get("opt_level", "all")))
    lvl = _GRAPH_OPT_ALIASES.get(str(lvl_raw).lower().split(".")[-1])
    if lvl is None:
        if strict:
            raise SettingsError("unknown graph optimisation level %r" % (lvl_raw,),
                                "use one of: " + ", ".join(GRAPH_OPT_LEVELS))
        lvl = "all"
    return {"threads": threads, "provider": prov, "graph_optimization_level": lvl}


def settings_id(settings):
    """Short human id of a settings dict, e.g. ``threads=2 xnnpack=on``."""
    parts = []
    for k, v in settings.items():
        if k == "xnnpack":
            v = "on" if v else "off"
        elif k == "provider":
            k, v = "ep", str(v).replace("ExecutionProvider", "")
        elif k == "graph_optimization_level":
            k = "opt"
        elif v is None:
            v = "default"
        parts.append("%s=%s" % (k, v))
    return " ".join(parts)


def onnx_available_providers():
    rt = import_runtime("onnxruntime")
    return list(rt.module.get_available_providers())


def sweep_grid(runtime_name, max_threads, requested_providers=(), notes=None):
    """Settings to sweep: threads 1..max_threads x (XNNPACK on/off | provider x graph level)."""
    threads = list(range(1, max(1, int(max_threads)) + 1))
    if runtime_name == "tflite":
        return [{"threads": t, "xnnpack": x} for t in threads for x in (True, False)]
    available = onnx_available_providers()
    requested = [provider_name(p) for p in requested_providers or ()]
    providers = []
    for p in requested + list(SWEEP_ACCELERATORS) + ["CPUExecutionProvider"]:
        if p in providers:
            continue
        if p in available:
            providers.append(p)
        elif p in requested and notes is not None:
            notes.append("%s requested but not available in this onnxruntime build (has %s): falling back "
                         "to CPUExecutionProvider (hint: pip install onnxruntime-gpu with matching CUDA/TensorRT "
                         "libraries)" % (p, ", ".join(available)))
            providers.append(p)  # marks it handled; removed below
    providers = [p for p in providers if p in available]
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    return [{"threads": t, "provider": p, "graph_optimization_level": lvl}
            for p in providers for t in threads for lvl in GRAPH_OPT_LEVELS]


def _shape_list(shape):
    out = []
    for d in shape:
        if isinstance(d, (int, np.integer)) and int(d) >= 0:
            out.append(int(d))
        else:
            out.append(None)
    return out


class Model:
    """A model opened in its runtime.

    Attributes: ``runtime`` (RuntimeInfo), ``settings`` (effective settings dict),
    ``notes`` (list of one-line notes, e.g. provider fallbacks), ``load_seconds``,
    ``input_shape`` (list, None for a dynamic dim), ``sample_shape`` (input shape
    without batch), ``input_dtype``, ``input_quant`` / ``output_quant``
    ((scale, zero_point) or None), ``batch_size`` (the fixed batch the model
    currently runs, None when the batch dimension is dynamic).

    * ``run_model_input(x)``: float32 model inputs (N, *sample_shape) -> float32 outputs;
      quantizes int inputs and dequantizes int outputs; loops/chunks over N as the
      model's batch size requires.
    * ``predict_raw(raw)``: applies the manifest preprocessing first (needs ``preprocessing``).
    * ``prepare(x)``: returns a zero-argument callable that runs one inference on ``x``
      (already quantized once, outside the timed region): what bench times.
    * ``set_batch_size(b)``: resize a fixed-batch model's input to ``b``; False if the
      runtime refuses (the model then keeps batch 1 and callers loop).
    """

    preprocessing = None
    input_layout = None

    def _init_io(self, input_shape, input_dtype, input_quant, output_shape, output_dtype, output_quant):
        self.input_shape = _shape_list(input_shape)
        self.sample_shape = tuple(d if d is not None else -1 for d in self.input_shape[1:])
        if any(d < 0 for d in self.sample_shape):
            raise ModelLoadError("model input has dynamic non-batch dimensions %s" % (self.input_shape,),
                                 "export the model with fixed input shape (only batch may be dynamic)")
        self.input_dtype = np.dtype(input_dtype)
        self.output_dtype = np.dtype(output_dtype)
        self.output_shape = _shape_list(output_shape)
        self.input_quant = input_quant if is_quantized_dtype(self.input_dtype) else None
        self.output_quant = output_quant if is_quantized_dtype(self.output_dtype) else None
        if is_quantized_dtype(self.input_dtype) and not self.input_quant:
            raise ModelLoadError("model input is %s but has no quantization parameters" % self.input_dtype.name,
                                 "re-export with input quantization (scale, zero_point)")
        b = self.input_shape[0] if self.input_shape else None
        self.batch_size = b

    # --- conversions -------------------------------------------------------------------------
    def _as_batch(self, x):
        x = np.asarray(x, dtype=np.float32)
        if x.shape == self.sample_shape:
            x = x[None]
        size = int(np.prod(self.sample_shape, dtype=np.int64))
        if x.ndim < 1 or int(np.prod(x.shape[1:], dtype=np.int64)) != size:
            raise ModelLoadError("input of shape %s does not fit the model input %s"
                                 % (list(x.shape), list(self.input_shape)),
                                 "pass float32 model inputs of shape (N, %s)"
                                 % ", ".join(str(d) for d in self.sample_shape))
        return x.reshape((x.shape[0],) + self.sample_shape)

    def to_runtime(self, x):
        """float32 batch -> the runtime's input dtype (quantized when the input is int)."""
        if self.input_quant:
            return quantize(x, self.input_quant[0], self.input_quant[1], self.input_dtype)
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def from_runtime(self, y):
        if self.output_quant:
            return dequantize(y, self.output_quant[0], self.output_quant[1])
        return np.asarray(y).astype(np.float32, copy=False)

    # --- running -----------------------------------------------------------------------------
    def _invoke(self, q):
        raise NotImplementedError

    def prepare(self, x):
        """Zero-argument callable running one inference on batch ``x`` (input conversion done here)."""
        q = self.to_runtime(self._as_batch(x))
        if self.batch_size is not None and q.shape[0] != self.batch_size:
            raise ModelLoadError("batch of %d given to a model running batch %d" % (q.shape[0], self.batch_size),
                                 "call set_batch_size first")
        return self._make_step(q)

    def _make_step(self, q):
        invoke = self._invoke
        return lambda: invoke(q)

    def run_model_input(self, x, chunk=256):
        """float32 model inputs -> float32 outputs (N, *output_shape[1:])."""
        q = self.to_runtime(self._as_batch(x))
        n = q.shape[0]
        b = self.batch_size or chunk
        outs = []
        for s in range(0, n, b):
            part = q[s:s + b]
            m = part.shape[0]
            if self.batch_size is not None and m < b:  # fixed batch: pad the last chunk
                part = np.concatenate([part, np.zeros((b - m,) + self.sample_shape, dtype=q.dtype)])
            outs.append(np.array(self._invoke(part)[:m]))
        if not outs:
            tail = tuple(d or 0 for d in self.output_shape[1:])
            return np.zeros((0,) + tail, dtype=np.float32)
        return self.from_runtime(np.concatenate(outs, axis=0))

    def predict_raw(self, raw):
        """Raw samples -> float32 outputs, applying the manifest preprocessing."""
        if self.preprocessing is None:
            raise ModelLoadError("this model was opened without the bundle's preprocessing",
                                 "open it with Bundle.open_model() or call run_model_input")
        x = preprocess_raw(raw, self.preprocessing, self.sample_shape, self.input_layout)
        return self.run_model_input(x)

    def set_batch_size(self, b):
        b = int(b)
        if self.batch_size is None or self.batch_size == b:
            return True
        return self._resize(b)

    def _resize(self, b):
        return False

    def info(self):
        return {"runtime": self.runtime.as_dict(), "settings": dict(self.settings), "notes": list(self.notes),
                "load_ms": self.load_seconds * 1e3, "input_shape": self.input_shape,
                "input_dtype": self.input_dtype.name, "output_dtype": self.output_dtype.name,
                "batch_size": self.batch_size}

    def close(self):
        pass


class TFLiteModel(Model):
    def __init__(self, path, rt, settings, output_name=None):
        self.runtime, self.path, self.notes = rt, path, []
        mod = rt.module
        kwargs = {}
        if settings["threads"] is not None:
            kwargs["num_threads"] = settings["threads"]
        if not settings["xnnpack"]:
            rtype = getattr(getattr(mod, "OpResolverType", None), "BUILTIN_WITHOUT_DEFAULT_DELEGATES", None)
            if rtype is None:
                self.notes.append("%s %s cannot disable XNNPACK (no OpResolverType); ran with defaults"
                                  % (rt.package, rt.version))
            else:
                kwargs["experimental_op_resolver_type"] = rtype
        t0 = time.perf_counter()
        try:
            it = mod.Interpreter(model_path=path, **kwargs)
            it.allocate_tensors()
        except Exception as e:
            raise ModelLoadError("%s does not load in %s %s: %s" % (
                os.path.basename(path), rt.package, rt.version, _first_line(e)),
                "the file may be corrupt or need a newer runtime; run verify, or pip install -U %s"
                % rt.package) from e
        self.load_seconds = time.perf_counter() - t0
        self._it = it
        ins, outs = it.get_input_details(), it.get_output_details()
        if len(ins) != 1:
            raise ModelLoadError("model has %d inputs; edgec bundles have exactly one" % len(ins),
                                 "re-export the model with a single input tensor")
        out = outs[0]
        if output_name and len(outs) > 1:
            named = [o for o in outs if o["name"] == output_name]
            out = named[0] if named else out
        if len(outs) > 1:
            self.notes.append("model has %d outputs; using %s" % (len(outs), out["name"]))
        inp = ins[0]
        self._in_idx, self._out_idx = inp["index"], out["index"]
        iq, oq = inp.get("quantization", (0.0, 0)), out.get("quantization", (0.0, 0))
        self._init_io(list(inp["shape"]), inp["dtype"], (float(iq[0]), int(iq[1])) if iq[0] else None,
                      list(out["shape"]), out["dtype"], (float(oq[0]), int(oq[1])) if oq[0] else None)
        self.input_name, self.output_name = inp["name"], out["name"]
        self.settings = dict(settings)

    def _invoke(self, q):
        it = self._it
        it.set_tensor(self._in_idx, q)
        it.invoke()
        return it.get_tensor(self._out_idx)

    def _make_step(self, q):
        it, ii, oi = self._it, self._in_idx, self._out_idx
        set_tensor, invoke, get_tensor = it.set_tensor, it.invoke, it.get_tensor

        def step():
            set_tensor(ii, q)
            invoke()
            return get_tensor(oi)
        return step

    def _probe_resize(self, shape):
        """Try the resize on a throw-away interpreter without delegates first: with XNNPACK,
        tflite-runtime 2.14 dies with SIGBUS in allocate_tensors when a Reshape has a
        hard-coded batch, where the reference kernels fail cleanly."""
        mod = self.runtime.module
        rtype = getattr(getattr(mod, "OpResolverType", None), "BUILTIN_WITHOUT_DEFAULT_DELEGATES", None)
        if rtype is None:
            return None
        try:
            probe = mod.Interpreter(model_path=self.path, experimental_op_resolver_type=rtype)
            probe.allocate_tensors()
            probe.resize_tensor_input(self._in_idx, shape)
            probe.allocate_tensors()
            probe.set_tensor(self._in_idx, np.zeros(shape, dtype=self.input_dtype))
            probe.invoke()
        except Exception as e:
            return _first_line(e)
        return None

    def _resize(self, b):
        it = self._it
        shape = [b] + list(self.sample_shape)
        if self.settings.get("xnnpack", True):
            why = self._probe_resize(shape)
            if why:
                self.notes.append("batch %d: runtime refused to resize the input (%s)" % (b, why))
                return False
        try:
            try:
                it.resize_tensor_input(self._in_idx, shape, strict=False)
            except TypeError:
                it.resize_tensor_input(self._in_idx, shape)
            it.allocate_tensors()
            out = [o for o in it.get_output_details() if o["index"] == self._out_idx][0]
            out_shape = [int(d) for d in out["shape"]]
            if not out_shape or out_shape[0] != b:
                raise ValueError("output batch is %s after resizing the input" % (out_shape[:1],))
            # a reshape with a hard-coded batch can allocate but fail at invoke: try once
            it.set_tensor(self._in_idx, np.zeros(shape, dtype=self.input_dtype))
            it.invoke()
        except Exception as e:
            self.notes.append("batch %d: runtime refused to resize the input (%s)" % (b, _first_line(e)))
            try:
                it.resize_tensor_input(self._in_idx, [self.batch_size] + list(self.sample_shape))
                it.allocate_tensors()
            except Exception:
                pass
            return False
        self.batch_size = b
        self.input_shape = shape
        self.output_shape = out_shape
        return True

    def close(self):
        self._it = None


class OnnxModel(Model):
    def __init__(self, path, rt, settings, io_meta=None):
        self.runtime, self.path, self.notes = rt, path, []
        ort = rt.module
        available = list(ort.get_available_providers())
        want = settings["provider"]
        if want in available:
            providers = [want] if want == "CPUExecutionProvider" else [want, "CPUExecutionProvider"]
        else:
            self.notes.append("%s requested but not available in onnxruntime %s (has %s); fell back to "
                              "CPUExecutionProvider (hint: pip install onnxruntime-gpu with matching "
                              "CUDA/TensorRT libraries)" % (want, rt.version, ", ".join(available)))
            providers = ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        so.graph_optimization_level = levels[settings["graph_optimization_level"]]
        if settings["threads"] is not None:
            so.intra_op_num_threads = settings["threads"]
            so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        t0 = time.perf_counter()
        try:
            sess = ort.InferenceSession(path, sess_options=so, providers=providers)
        except Exception as e:
            raise ModelLoadError("%s does not load in onnxruntime %s: %s" % (
                os.path.basename(path), rt.version, _first_line(e)),
                "the file may be corrupt or need a newer runtime; run verify, or pip install -U onnxruntime") from e
        self.load_seconds = time.perf_counter() - t0
        self._sess = sess
        got = list(sess.get_providers())
        if want in available and want not in got:
            self.notes.append("%s is installed but failed to initialise; running on %s"
                              % (want, ", ".join(got)))
        ins, outs = sess.get_inputs(), sess.get_outputs()
        if len(ins) != 1:
            raise ModelLoadError("model has %d inputs; edgec bundles have exactly one" % len(ins),
                                 "re-export the model with a single input tensor")
        if len(outs) > 1:
            self.notes.append("model has %d outputs; using %s" % (len(outs), outs[0].name))
        inp, out = ins[0], outs[0]
        meta = io_meta or {}
        self._init_io(inp.shape, _DTYPES.get(inp.type, np.float32), _quant(meta.get("input")),
                      out.shape, _DTYPES.get(out.type, np.float32), _quant(meta.get("output")))
        self.input_name, self.output_name = inp.name, out.name
        self._out_names = [out.name]
        self.settings = dict(settings)
        self.settings["providers"] = got

    def _invoke(self, q):
        return self._sess.run(self._out_names, {self.input_name: q})[0]

    def _make_step(self, q):
        run, names, feed = self._sess.run, self._out_names, {self.input_name: q}
        return lambda: run(names, feed)

    def close(self):
        self._sess = None


def _quant(meta):
    q = (meta or {}).get("quantization") if isinstance(meta, dict) else None
    if not q or not q.get("scale"):
        return None
    scale, zp = q["scale"], q.get("zero_point", 0)
    if isinstance(scale, (list, tuple)):
        scale = scale[0]
    if isinstance(zp, (list, tuple)):
        zp = zp[0]
    return (float(scale), int(zp))


def _first_line(e):
    text = str(e).strip() or type(e).__name__
    return " ".join(text.splitlines()[0].split())[:300]


def open_model(model_path, runtime_name, settings=None, package=None, io_meta=None):
    """Open ``model_path`` in ``runtime_name`` ("tflite" | "onnxruntime").

    ``settings``: see module doc (normalized strictly); ``package``: force a runtime package;
    ``io_meta``: ``{"input": manifest inputs[0], "output": manifest outputs[0]}`` (used for the
    output tensor name and, for ONNX models with int I/O, their quantization).
    """
    s = normalize_settings(runtime_name, settings, strict=True)
    rt = import_runtime(runtime_name, package)
    if not os.path.isfile(model_path):
        raise ModelLoadError("model file %s not found" % model_path, "run verify to check the bundle")
    if runtime_name == "tflite":
        out_name = ((io_meta or {}).get("output") or {}).get("name")
        return TFLiteModel(model_path, rt, s, out_name)
    return OnnxModel(model_path, rt, s, io_meta)
