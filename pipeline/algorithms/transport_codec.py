"""Encoder of the transport payload (the format and the decoder: ``edgec.ondevice.transport``).

``encode_transport(model_bytes, codebooks)`` returns the smallest payload it can prove correct:
for a TFLite file, each int8 buffer that pays for it is cut out of the file and stored as zero
runs plus values (``sparse``) or plus indices into one of the weight-sharing ``codebooks`` with
the per-channel scales recomputed from them (``shared``); anything else (ONNX, a file this
encoder cannot parse) is one LZMA2 stream of the whole file. Every payload is decoded again with
the on-device decoder and must give back the file byte for byte (ExportError otherwise), and a
plain LZMA2 payload is kept whenever it is not larger.

Parsing uses the TFLite flatbuffer schema shipped with ai-edge-litert; the decoder needs no
parser at all, since the payload names the byte ranges it fills.
"""

from __future__ import annotations

import json
import logging
import lzma
import math
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from edgec.base.errors import ExportError
from edgec.ondevice import transport as fmt

log = logging.getLogger(__name__)

# LZMA2 literal/position settings tried per section: the defaults, byte streams without position
# context (runs, indices) and 4-byte-aligned data (float32 codebooks and scales, int32 biases).
FILTER_GRID = [(3, 0, 2), (0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (0, 2, 2), (4, 0, 2)]
SCALE_DIVISORS = (127.0, 127.5, 128.0, 255.0)
MAX_FIX_FRACTION = 0.25  # predicted scales: at most this share of rows may need an explicit value
LARGE_SECTION = 1 << 20
DENSE = 0.5  # int8 buffers with more non-zeros than this stay in the skeleton as they are


def _dict_log(n: int) -> int:
    return min(26, max(12, math.ceil(math.log2(max(n, 1)))))


def compress_section(data: bytes, grid=FILTER_GRID) -> tuple[bytes, list[int]]:
    """Smallest raw LZMA2 stream of ``data`` over ``grid``: ``(stream, [zlen, len, lc, lp, pb, dict_log])``.

    Sections above ``LARGE_SECTION`` bytes (big dense models) try the default settings only, at
    preset 9 without "extreme", so encoding stays seconds, not minutes.
    """
    best = None
    d = _dict_log(len(data))
    large = len(data) > LARGE_SECTION
    preset = 9 if large else 9 | lzma.PRESET_EXTREME
    for lc, lp, pb in grid[:1] if large else grid:
        filters = [{"id": lzma.FILTER_LZMA2, "preset": preset, "lc": lc, "lp": lp, "pb": pb, "dict_size": 1 << d}]
        z = lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)
        if best is None or len(z) < len(best[0]):
            best = (z, [len(z), len(data), lc, lp, pb, d])
    return best


def _quick_size(data: bytes) -> int:
    return len(compress_section(data, grid=[(3, 0, 2), (0, 0, 0)])[0])


@dataclass
class _Payload:
    size: int
    sections: list[tuple[bytes, list[int]]] = field(default_factory=list)
    cuts: list[tuple[int, int]] = field(default_factory=list)
    tensors: list[dict] = field(default_factory=list)

    def add(self, data: bytes) -> int:
        self.sections.append(compress_section(data))
        return len(self.sections) - 1

    def build(self, model: bytes, grid=FILTER_GRID) -> bytes:
        cuts = sorted(self.cuts)
        skeleton, pos = [], 0
        for offset, length in cuts:
            skeleton.append(model[pos:offset])
            pos = offset + length
        skeleton.append(model[pos:])
        sections = [compress_section(b"".join(skeleton), grid)] + self.sections
        shift = lambda i: i + 1 if isinstance(i, int) and i >= 0 else i  # noqa: E731 (skeleton is section 0)
        tensors = []
        for t in self.tensors:
            t = {k: (shift(v) if k in ("r", "v", "i", "cb", "x") else v) for k, v in t.items()}
            if "sc" in t and "x" in t["sc"]:
                t["sc"] = {**t["sc"], "x": shift(t["sc"]["x"])}
            tensors.append(t)
        header = {"n": self.size, "s": [spec for _, spec in sections], "k": 0, "c": [list(c) for c in cuts], "t": tensors}
        h = fmt.HEADER_FILTER
        raw_header = json.dumps(header, separators=(",", ":")).encode()
        z_header = lzma.compress(raw_header, format=lzma.FORMAT_RAW,
                                 filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
                                           "lc": h["lc"], "lp": h["lp"], "pb": h["pb"], "dict_size": 1 << h["dict_log"]}])
        rest = struct.pack("<II", zlib.crc32(model), len(z_header)) + z_header + b"".join(z for z, _ in sections)
        return struct.pack("<4sBI", fmt.MAGIC, fmt.VERSION, zlib.crc32(rest)) + rest


def encode_plain(model: bytes) -> bytes:
    """The whole file as one LZMA2 stream (any format), with LZMA's default literal settings."""
    return _Payload(len(model)).build(model, grid=FILTER_GRID[:1])


def encode_transport(model: bytes, codebooks: Iterable[np.ndarray] = ()) -> bytes:
    """The smallest proven payload for ``model`` (see the module docstring)."""
    model = bytes(model)
    candidates = [encode_plain(model)]
    if model[4:8] == b"TFL3":
        try:
            candidates.append(_encode_tflite(model, [np.asarray(c, dtype=np.float32).ravel() for c in codebooks]))
        except Exception as e:  # an unexpected file layout: fall back to the plain payload
            log.warning("transport: TFLite weight coding skipped (%s: %s)", type(e).__name__, e)
    for payload in sorted(candidates, key=len):
        try:
            if fmt.decode(payload, max_size=len(model)) == model:
                return payload
        except fmt.TransportError as e:
            log.warning("transport: a candidate payload does not decode (%s)", e)
    raise ExportError("transport payload does not decode to the model file")


# --- TFLite -------------------------------------------------------------------------------------


@dataclass
class _Int8Buffer:
    offset: int
    length: int
    scales: np.ndarray | None  # float32 per channel (quantized dimension 0), or None
    scales_offset: int | None


def _vector_span(table, field_offset: int) -> tuple[int, int] | None:
    """(absolute start, element count) of a flatbuffer vector field, or None when absent."""
    o = table._tab.Offset(field_offset)
    if not o:
        return None
    return table._tab.Vector(o), table._tab.VectorLen(o)


def _int8_buffers(model: bytes) -> list[_Int8Buffer]:
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    found, seen = [], set()
    for g in range(root.SubgraphsLength()):
        graph = root.Subgraphs(g)
        for i in range(graph.TensorsLength()):
            tensor = graph.Tensors(i)
            b = tensor.Buffer()
            if tensor.Type() != schema.TensorType.INT8 or b == 0 or b in seen:
                continue
            seen.add(b)
            buf = root.Buffers(b)
            span = _vector_span(buf, 4)
            if span is not None and span[1] > 0:
                offset, length = span
            elif buf.Offset() > 1 and buf.Size() > 0:
                offset, length = buf.Offset(), buf.Size()
            else:
                continue
            scales = scales_offset = None
            q = tensor.Quantization()
            if q is not None and q.ScaleLength() > 0:
                rows = q.ScaleLength()
                if (rows == 1 or q.QuantizedDimension() == 0) and length % rows == 0:
                    start, _ = _vector_span(q, 8)
                    scales = np.frombuffer(model, dtype="<f4", count=rows, offset=start).copy()
                    scales_offset = start
            found.append(_Int8Buffer(offset, length, scales, scales_offset))
    return found


def _map_to_codebook(values: np.ndarray, rows_of: np.ndarray, scales: np.ndarray, codebook: np.ndarray):
    """Codebook index of each stored int8 value through its row's scale, and the misses."""
    table = fmt.codebook_table(codebook, scales).astype(np.int16)
    order = np.argsort(codebook, kind="stable")
    sorted_cb = codebook[order].astype(np.float64)
    approx = values.astype(np.float64) * scales[rows_of].astype(np.float64)
    if len(sorted_cb) > 1:
        nearest = np.searchsorted((sorted_cb[1:] + sorted_cb[:-1]) / 2, approx)
    else:
        nearest = np.zeros(len(values), dtype=np.int64)
    index = np.zeros(len(values), dtype=np.int64)
    found = np.zeros(len(values), dtype=bool)
    for step in (0, -1, 1, -2, 2):
        k = order[np.clip(nearest + step, 0, len(order) - 1)]
        hit = ~found & (table[rows_of, k] == values)
        index[hit] = k[hit]
        found |= hit
    return index, ~found


def _predicted_scales(codebook, index, rows_of, rows, actual: np.ndarray):
    """Best scale prediction: (spec without offset, fixes as (row, bits) pairs), or None."""
    actual_bits = actual.astype("<f4").view("<u4")
    used = np.zeros(rows, dtype=bool)
    used[rows_of] = True
    empty = actual_bits[~used]
    empty_bits = 0
    if len(empty):
        bits, counts = np.unique(empty, return_counts=True)
        empty_bits = int(bits[counts.argmax()])
    best = None
    for divisor in SCALE_DIVISORS:
        pred = fmt.predict_scales(codebook, index, rows_of, rows, divisor, empty_bits).view("<u4")
        wrong = np.flatnonzero(pred != actual_bits)
        if best is None or len(wrong) < len(best[1]):
            best = (divisor, wrong)
    divisor, wrong = best
    if len(wrong) > MAX_FIX_FRACTION * rows:
        return None
    fixes = np.stack([wrong.astype("<u4"), actual_bits[wrong].astype("<u4")], axis=1)
    return {"d": divisor, "e": empty_bits}, fixes


def _encode_tflite(model: bytes, codebooks: list[np.ndarray]) -> bytes:
    payload = _Payload(len(model))
    for buf in _int8_buffers(model):
        data = np.frombuffer(model, dtype=np.int8, count=buf.length, offset=buf.offset)
        positions = np.flatnonzero(data)
        if len(positions) > DENSE * buf.length:
            continue
        values = data[positions]
        runs = fmt.encode_runs(positions)
        sparse_cost = _quick_size(runs) + _quick_size(values.tobytes())
        # Mostly zeros: sparse always wins, so skip compressing the dense buffer to compare.
        best = ("raw", _quick_size(data.tobytes()) if len(positions) > buf.length // 4 else math.inf, None)
        if sparse_cost < best[1]:
            best = ("sparse", sparse_cost, None)
        if buf.scales is not None and len(positions):
            rows = len(buf.scales)
            rows_of = positions // (buf.length // rows)
            for codebook in codebooks:
                if not 0 < len(codebook) <= 256:
                    continue
                index, missed = _map_to_codebook(values, rows_of, buf.scales, codebook)
                if missed.mean() > 0.01:
                    continue
                scales = _predicted_scales(codebook, index, rows_of, rows, buf.scales)
                cost = (_quick_size(runs) + _quick_size(index.astype(np.uint8).tobytes()) + 4 * len(codebook)
                        + 5 * int(missed.sum()) - (4 * rows - 8 * len(scales[1]) if scales else 0))
                if cost < best[1]:
                    best = ("shared", cost, (codebook, index, missed, scales))
        kind = best[0]
        if kind == "raw":
            continue
        payload.cuts.append((buf.offset, buf.length))
        t = {"m": kind, "o": buf.offset, "n": buf.length, "r": payload.add(runs)}
        if kind == "sparse":
            t["v"] = payload.add(values.tobytes())
        else:
            codebook, index, missed, scales = best[2]
            t.update(rows=len(buf.scales), i=payload.add(index.astype(np.uint8).tobytes()),
                     cb=payload.add(codebook.astype("<f4").tobytes()))
            where = np.flatnonzero(missed)
            t["x"] = payload.add(positions[where].astype("<u4").tobytes() + values[where].tobytes()) if len(where) else -1
            if scales is not None:
                spec, fixes = scales
                payload.cuts.append((buf.scales_offset, 4 * len(buf.scales)))
                t["sc"] = {"o": buf.scales_offset, **spec, "x": payload.add(fixes.tobytes()) if len(fixes) else -1}
            else:
                t["sc"] = {"o": buf.scales_offset}
        payload.tensors.append(t)
    return payload.build(model)


def describe(payload: bytes) -> dict:
    """Header summary of a payload (for reports and tests): encodings and section sizes."""
    _, version, _, _, header_len = fmt._HEAD.unpack_from(payload)
    h = fmt.HEADER_FILTER
    header = json.loads(lzma.decompress(payload[fmt._HEAD.size:fmt._HEAD.size + header_len], format=lzma.FORMAT_RAW,
                                        filters=fmt.lzma_filters(h["lc"], h["lp"], h["pb"], h["dict_log"])))
    return {"version": version, "bytes": len(payload), "header_bytes": fmt._HEAD.size + header_len,
            "skeleton_bytes": header["s"][header["k"]][0], "tensors": [t["m"] for t in header["t"]]}


__all__ = ["compress_section", "describe", "encode_plain", "encode_transport"]
