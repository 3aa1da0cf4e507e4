"""What every runtime shares: ``RuntimeInfo``, the ``Model`` base class and settings helpers.

The runtime modules (``runtime_tflite``, ``runtime_onnx``) subclass ``Model``; ``runtimes``
dispatches between them. numpy only: runtimes are imported lazily by ``runtimes.import_runtime``.
"""

import importlib

import numpy as np

from .errors import ModelLoadError, SettingsError
from .preprocess import dequantize, is_quantized_dtype, preprocess_raw, quantize

# Threads a setting may ask for (a manifest's runtime.recommended, recommended.json, --threads).
MAX_THREADS = 256


class RuntimeInfo:
    """An imported runtime: ``name`` (tflite|onnxruntime), ``package`` (pip name), ``version``, ``module``."""

    def __init__(self, name, package, version, module):
        self.name, self.package, self.version, self.module = name, package, version, module

    def as_dict(self):
        return {"name": self.name, "package": self.package, "version": self.version}


def version_of(module, package):
    for obj in (module, importlib.import_module(module.__name__.split(".")[0])):
        v = getattr(obj, "__version__", None)
        if v:
            return str(v)
    try:
        from importlib import metadata
        return metadata.version(package)
    except Exception:
        return "unknown"


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


def as_threads(v, strict):
    """``threads`` setting -> int in 1..MAX_THREADS, or None (runtime default)."""
    if v is None or v == "default" or (v == 0 and not isinstance(v, bool)):
        return None
    if isinstance(v, bool) or isinstance(v, float) and not v.is_integer():
        t = None
    else:
        try:
            t = int(v)
        except (TypeError, ValueError, OverflowError):
            t = None
    if t is None:
        if strict:
            raise SettingsError("threads must be a positive integer, got %r" % (v,), "e.g. --threads 2")
        return None
    if not 1 <= t <= MAX_THREADS:
        if strict:
            raise SettingsError("threads must be between 1 and %d, got %r" % (MAX_THREADS, v), "e.g. --threads 2")
        return None
    return t


def as_bool(v):
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "on", "yes")
    return bool(v)


def first_line(e):
    text = str(e).strip() or type(e).__name__
    return " ".join(text.splitlines()[0].split())[:300]


def shape_list(shape):
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
        self.input_shape = shape_list(input_shape)
        self.sample_shape = tuple(d if d is not None else -1 for d in self.input_shape[1:])
        if any(d < 0 for d in self.sample_shape):
            raise ModelLoadError("model input has dynamic non-batch dimensions %s" % (self.input_shape,),
                                 "export the model with fixed input shape (only batch may be dynamic)")
        self.input_dtype = np.dtype(input_dtype)
        self.output_dtype = np.dtype(output_dtype)
        self.output_shape = shape_list(output_shape)
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
