"""Numeric transforms between raw samples, model inputs and runtime tensors.

* ``preprocess_raw``: manifest ``preprocessing``: ``model_input = raw * scale + offset``
  computed in float32, then laid out as the model input (transpose when the raw
  layout and the model layout are both given and differ, else reshape).
* ``quantize`` / ``dequantize``: affine int quantization as TFLite defines it,
  ``q = clamp(round_half_away_from_zero(x / scale) + zero_point)`` and
  ``x = (q - zero_point) * scale``, both in float32.
"""

import numpy as np

from .errors import BundleError, ManifestError

_INT_DTYPES = ("int8", "uint8", "int16", "uint16", "int32")


def _layout_letters(layout):
    if not isinstance(layout, str):
        return None
    s = layout.strip().upper()
    if not s or not s.isalpha() or len(set(s)) != len(s):
        return None
    return s[1:] if s.startswith("N") else s


def _per_sample_param(value, sample_shape, layout, what):
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 0:
        return arr
    if arr.ndim == 1 and arr.size > 1:
        letters = _layout_letters(layout)
        if letters and "C" in letters and len(letters) == len(sample_shape):
            axis = letters.index("C")
            if sample_shape[axis] == arr.size:
                shape = [1] * len(sample_shape)
                shape[axis] = arr.size
                return arr.reshape(shape)
    try:
        np.broadcast_shapes(arr.shape, tuple(sample_shape))
    except ValueError:
        raise ManifestError(
            "manifest.json: preprocessing.%s has shape %s, which does not fit raw samples of shape %s"
            % (what, list(arr.shape), list(sample_shape)),
            "use a scalar or one value per channel with preprocessing.layout naming the channel axis",
        ) from None
    return arr


def preprocess_raw(raw, preprocessing, sample_shape, model_layout=None):
    """Raw samples -> float32 model inputs of shape (N, *sample_shape).

    ``raw`` is one sample (shape ``preprocessing.raw_shape``) or a batch of them.
    ``sample_shape`` is the model input shape without its batch dimension.
    """
    pre = preprocessing or {}
    raw = np.asarray(raw)
    sample_shape = tuple(int(d) for d in sample_shape)
    raw_shape = pre.get("raw_shape")
    raw_shape = tuple(int(d) for d in raw_shape) if raw_shape else None
    if raw_shape is not None and raw.shape == raw_shape:
        raw = raw[None]
    elif raw_shape is None and raw.shape == sample_shape:
        raw = raw[None]
    if raw.ndim == 0:
        raise BundleError("raw input is a scalar", "pass an array of samples")
    n = raw.shape[0]
    per_sample = raw.shape[1:]
    if raw_shape is not None and tuple(per_sample) != raw_shape and \
            int(np.prod(per_sample, dtype=np.int64)) != int(np.prod(raw_shape, dtype=np.int64)):
        raise BundleError(
            "raw samples have shape %s, the bundle expects %s per sample"
            % (list(per_sample), list(raw_shape)),
            "pass an array of shape (N, %s)" % ", ".join(str(d) for d in raw_shape),
        )
    raw_layout = pre.get("layout")
    scale = _per_sample_param(pre.get("scale", 1.0), per_sample, raw_layout, "scale")
    offset = _per_sample_param(pre.get("offset", 0.0), per_sample, raw_layout, "offset")
    x = raw.astype(np.float32) * scale + offset
    x = x.astype(np.float32, copy=False)
    a, b = _layout_letters(raw_layout), _layout_letters(model_layout)
    if a and b and a != b and sorted(a) == sorted(b) and len(a) == x.ndim - 1:
        x = np.transpose(x, [0] + [1 + a.index(ch) for ch in b])
    if int(np.prod(x.shape[1:], dtype=np.int64)) != int(np.prod(sample_shape, dtype=np.int64)):
        raise BundleError(
            "raw samples of shape %s do not fit the model input %s"
            % (list(x.shape[1:]), list(sample_shape)),
            "check preprocessing.raw_shape in manifest.json",
        )
    return np.ascontiguousarray(x.reshape((n,) + sample_shape), dtype=np.float32)


def is_quantized_dtype(dtype):
    return np.dtype(dtype).name in _INT_DTYPES


def _round_half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))


def quantize(x, scale, zero_point, dtype):
    """float32 -> integer tensor of ``dtype`` with TFLite's rounding (half away from zero)."""
    dtype = np.dtype(dtype)
    scale = np.float32(scale)
    if not scale > 0:
        raise BundleError("input quantization scale is %r" % float(scale),
                          "the model's int input has no valid quantization parameters; re-export")
    info = np.iinfo(dtype)
    v = _round_half_away(np.asarray(x, dtype=np.float32) / scale) + np.float32(zero_point)
    return np.clip(v, info.min, info.max).astype(dtype)


def dequantize(q, scale, zero_point):
    """integer tensor -> float32: ``(q - zero_point) * scale``."""
    return ((np.asarray(q).astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(
        np.float32, copy=False)
