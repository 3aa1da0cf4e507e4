"""TFLite: ``ai_edge_litert.interpreter`` (preferred), else ``tflite_runtime.interpreter``.

Settings: ``{"threads": int | None, "xnnpack": bool}``; ``xnnpack=False`` builds the interpreter
with ``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``. The runtime module is passed in
(``RuntimeInfo.module``); nothing here imports it.
"""

import os
import time

import numpy as np

from .errors import ModelLoadError, RuntimeMissingError
from .quiet import native_stderr_quiet
from .runtime_base import Model, as_bool, first_line

NAME = "tflite"
# (module, pip package) in order of preference
MODULES = (
    ("ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime.interpreter", "tflite-runtime"),
)
PACKAGES = ("ai-edge-litert", "tflite-runtime")


def missing_error(tried):
    return RuntimeMissingError(
        "no TFLite runtime is installed (tried %s)" % ", ".join(m for m, _ in tried),
        "pip install ai-edge-litert (or, on Raspberry Pi OS bookworm / Python 3.11, "
        "pip install tflite-runtime==2.14.0 'numpy<2'); see requirements.txt in the bundle")


def normalize(settings, threads):
    """Canonical TFLite settings (``threads`` already parsed by the caller)."""
    return {"threads": threads, "xnnpack": as_bool(settings.get("xnnpack", True))}


def sweep(threads):
    """threads x XNNPACK on/off."""
    return [{"threads": t, "xnnpack": x} for t in threads for x in (True, False)]


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
            with native_stderr_quiet():  # the XNNPACK delegate announces itself on fd 2
                it = mod.Interpreter(model_path=path, **kwargs)
                it.allocate_tensors()
        except Exception as e:
            raise ModelLoadError("%s does not load in %s %s: %s" % (
                os.path.basename(path), rt.package, rt.version, first_line(e)),
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
            return first_line(e)
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
            with native_stderr_quiet():
                it.allocate_tensors()
            out = [o for o in it.get_output_details() if o["index"] == self._out_idx][0]
            out_shape = [int(d) for d in out["shape"]]
            if not out_shape or out_shape[0] != b:
                raise ValueError("output batch is %s after resizing the input" % (out_shape[:1],))
            # a reshape with a hard-coded batch can allocate but fail at invoke: try once
            it.set_tensor(self._in_idx, np.zeros(shape, dtype=self.input_dtype))
            it.invoke()
        except Exception as e:
            self.notes.append("batch %d: runtime refused to resize the input (%s)" % (b, first_line(e)))
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


def open_tflite(model_path, rt, settings, io_meta=None):
    out_name = ((io_meta or {}).get("output") or {}).get("name")
    return TFLiteModel(model_path, rt, settings, out_name)
