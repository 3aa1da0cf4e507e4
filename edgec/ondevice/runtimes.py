"""Open a bundle's model in its runtime and run it: dispatch to one module per runtime.

* ``runtime_tflite``: ``ai_edge_litert.interpreter`` (preferred), else ``tflite_runtime.interpreter``.
* ``runtime_onnx``: ``onnxruntime``.
* ``runtime_base``: the ``Model`` base class and what both share.

Runtimes are imported lazily, inside ``import_runtime``, so that importing this package needs
numpy only. Settings are a plain dict (what ``runtime.recommended`` in manifest.json holds; see
each runtime module). ``threads=None`` leaves the runtime's default; otherwise 1..MAX_THREADS.
"""

import importlib
import os

from . import runtime_onnx, runtime_tflite
from .errors import ModelLoadError, SettingsError
from .runtime_base import MAX_THREADS, Model, RuntimeInfo, as_threads, version_of, version_tuple
from .runtime_onnx import GRAPH_OPT_LEVELS, SWEEP_ACCELERATORS, OnnxModel, provider_name
from .runtime_tflite import TFLiteModel

_BACKENDS = {runtime_tflite.NAME: runtime_tflite, runtime_onnx.NAME: runtime_onnx}
RUNTIMES = tuple(_BACKENDS)

_PACKAGE_ALIASES = {
    "ai-edge-litert": "ai-edge-litert", "ai_edge_litert": "ai-edge-litert", "litert": "ai-edge-litert",
    "tflite-runtime": "tflite-runtime", "tflite_runtime": "tflite-runtime",
    "onnxruntime": "onnxruntime", "ort": "onnxruntime",
    "onnxruntime-gpu": "onnxruntime", "onnxruntime_gpu": "onnxruntime",
}
_KNOWN_SETTINGS = {"threads", "num_threads", "intra_op_num_threads", "xnnpack", "provider", "providers",
                   "execution_provider", "graph_optimization_level", "graph_opt", "opt_level"}

__all__ = ["GRAPH_OPT_LEVELS", "MAX_THREADS", "Model", "OnnxModel", "RUNTIMES", "RuntimeInfo", "SWEEP_ACCELERATORS",
           "TFLiteModel", "import_runtime", "normalize_settings", "onnx_available_providers", "open_model",
           "provider_name", "settings_id", "sweep_grid", "version_tuple"]


def _backend(runtime_name):
    try:
        return _BACKENDS[runtime_name]
    except (KeyError, TypeError):
        raise SettingsError("unknown runtime %r" % (runtime_name,), "use one of: " + ", ".join(RUNTIMES)) from None


def import_runtime(runtime_name, package=None):
    """Import the runtime for ``runtime_name`` ("tflite" | "onnxruntime").

    ``package`` forces one package ("ai-edge-litert", "tflite-runtime", "onnxruntime");
    None picks the first importable one. Raises RuntimeMissingError naming the pip package.
    """
    backend = _backend(runtime_name)
    if package is not None and package != "auto":
        pkg = _PACKAGE_ALIASES.get(str(package).lower())
        if pkg is None:
            raise SettingsError("unknown runtime package %r" % (package,),
                                "use ai-edge-litert or tflite-runtime (TFLite), onnxruntime (ONNX)")
        if pkg not in backend.PACKAGES:
            raise SettingsError("runtime %r cannot run a %s bundle" % (package, runtime_name),
                                "leave --runtime out to use the bundle's runtime")
    else:
        pkg = None
    tried = tuple(t for t in backend.MODULES if pkg is None or t[1] == pkg)
    for modname, pipname in tried:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        return RuntimeInfo(runtime_name, pipname, version_of(mod, pipname), mod)
    raise backend.missing_error(tried)


def normalize_settings(runtime_name, settings=None, strict=True):
    """Canonical settings dict for ``runtime_name`` (unknown keys or bad values: SettingsError when
    strict, else ignored / the default)."""
    backend = _backend(runtime_name)
    if settings is not None and not isinstance(settings, dict):
        if strict:
            raise SettingsError("runtime settings must be an object, got %s" % type(settings).__name__,
                                "e.g. {\"threads\": 2}")
        settings = None
    s = dict(settings or {})
    if strict:
        unknown = [str(k) for k in s if k not in _KNOWN_SETTINGS]
        if unknown:
            raise SettingsError("unknown runtime setting(s): %s" % ", ".join(sorted(unknown))[:200],
                                "known: threads, xnnpack (tflite), provider, graph_optimization_level (onnx)")
    threads = None
    for k in ("threads", "num_threads", "intra_op_num_threads"):
        if k in s:
            threads = as_threads(s[k], strict)
            break
    if backend is runtime_tflite:
        return runtime_tflite.normalize(s, threads)
    return runtime_onnx.normalize(s, threads, strict)


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
    backend = _backend(runtime_name)
    n = as_threads(max_threads, strict=True) or 1
    threads = list(range(1, n + 1))
    if backend is runtime_tflite:
        return runtime_tflite.sweep(threads)
    return runtime_onnx.sweep(threads, onnx_available_providers(), requested_providers, notes)


def open_model(model_path, runtime_name, settings=None, package=None, io_meta=None):
    """Open ``model_path`` in ``runtime_name`` ("tflite" | "onnxruntime").

    ``settings``: see the runtime modules (normalized strictly); ``package``: force a runtime
    package; ``io_meta``: ``{"input": manifest inputs[0], "output": manifest outputs[0]}`` (used for
    the output tensor name and, for ONNX models with int I/O, their quantization).
    """
    s = normalize_settings(runtime_name, settings, strict=True)
    rt = import_runtime(runtime_name, package)
    if not os.path.isfile(model_path):
        raise ModelLoadError("model file %s not found" % model_path, "run verify to check the bundle")
    if runtime_name == runtime_tflite.NAME:
        return runtime_tflite.open_tflite(model_path, rt, s, io_meta)
    return runtime_onnx.open_onnx(model_path, rt, s, io_meta)
