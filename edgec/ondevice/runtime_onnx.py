"""ONNX Runtime: ``onnxruntime`` (or onnxruntime-gpu, which installs the same module).

Settings: ``{"threads": int | None, "provider": "CPUExecutionProvider" | ...,
"graph_optimization_level": "all" | "extended" | "basic" | "disable_all"}``. ``threads`` sets
``intra_op_num_threads`` (inter-op 1, sequential execution). A requested provider that this
onnxruntime build lacks (CUDA, TensorRT, ...) falls back to CPUExecutionProvider with a note in
``Model.notes``. The runtime module is passed in (``RuntimeInfo.module``); nothing here imports it.
"""

import os
import time

import numpy as np

from .errors import ModelLoadError, RuntimeMissingError, SettingsError
from .runtime_base import Model, first_line

NAME = "onnxruntime"
MODULES = (("onnxruntime", "onnxruntime"),)
PACKAGES = ("onnxruntime",)

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


def missing_error(tried):
    return RuntimeMissingError("onnxruntime is not installed",
                               "pip install onnxruntime (onnxruntime-gpu for CUDA/TensorRT); "
                               "see requirements.txt in the bundle")


def provider_name(p):
    return _PROVIDER_ALIASES.get(str(p).lower(), str(p))


def _is_provider(p):
    return isinstance(p, str) and 0 < len(p) <= 100 and p.replace("_", "").isalnum()


def normalize(settings, threads, strict):
    """Canonical ONNX settings (``threads`` already parsed by the caller)."""
    s = settings
    prov = s.get("provider", s.get("execution_provider"))
    if prov is None and s.get("providers"):
        provs = s["providers"]
        prov = provs[0] if isinstance(provs, (list, tuple)) else provs
    if prov is not None and not _is_provider(prov):
        if strict:
            raise SettingsError("execution provider must be a name such as CPUExecutionProvider, got %r"
                                % (prov,), "e.g. --provider cpu")
        prov = None
    prov = provider_name(prov) if prov else "CPUExecutionProvider"
    lvl_raw = s.get("graph_optimization_level", s.get("graph_opt", s.get("opt_level", "all")))
    lvl = _GRAPH_OPT_ALIASES.get(str(lvl_raw).lower().split(".")[-1]) if isinstance(lvl_raw, (str, int)) \
        and not isinstance(lvl_raw, bool) else None
    if lvl is None:
        if strict:
            raise SettingsError("unknown graph optimisation level %r" % (lvl_raw,),
                                "use one of: " + ", ".join(GRAPH_OPT_LEVELS))
        lvl = "all"
    return {"threads": threads, "provider": prov, "graph_optimization_level": lvl}


def sweep(threads, available, requested_providers=(), notes=None):
    """provider x threads x graph level, over the providers this build has (requested first)."""
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
                os.path.basename(path), rt.version, first_line(e)),
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
        self._init_io(inp.shape, _DTYPES.get(inp.type, np.float32), quant_of(meta.get("input")),
                      out.shape, _DTYPES.get(out.type, np.float32), quant_of(meta.get("output")))
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


def quant_of(meta):
    """(scale, zero_point) from a manifest tensor's ``quantization`` (first channel), or None."""
    q = (meta or {}).get("quantization") if isinstance(meta, dict) else None
    if not isinstance(q, dict) or not q.get("scale"):
        return None
    scale, zp = q["scale"], q.get("zero_point", 0)
    if isinstance(scale, (list, tuple)):
        scale = scale[0]
    if isinstance(zp, (list, tuple)):
        zp = zp[0] if zp else 0
    return (float(scale), int(zp))


def open_onnx(model_path, rt, settings, io_meta=None):
    return OnnxModel(model_path, rt, settings, io_meta)
