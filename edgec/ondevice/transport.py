"""Transport payload: what a device downloads, decoded here to the model file byte for byte.

numpy + stdlib only (this package ships inside every bundle). The host-side encoder is
``edgec.pipeline.algorithms.transport_codec``; it decodes every payload it writes before keeping it.

A pruned, weight-shared model file is mostly zeros and a few distinct values, but an int8 TFLite
file quantizes each output channel with its own scale, so one shared value becomes a different
int8 number in every row, and a general compressor sees ~7.5 bits of entropy per stored weight
where the weight-sharing codebook needs ~5. The payload therefore stores such a weight buffer as
Deep Compression does (Han et al. 2016): the positions of its non-zeros (zero runs) and, per
non-zero, an index into the layer's codebook; the decoder turns index ``k`` of row ``r`` back
into the int8 value ``rint(codebook[k] / scale[r])`` (IEEE float32 arithmetic, exact on every
platform), and the per-channel scales themselves are recomputed from the codebook as
``max |codebook value in the row| / divisor`` where that holds. Everything else of the file
(the "skeleton": graph, names, biases, quantization parameters) is carried as is.

Layout::

    b"EDGT" | u8 version | u32 crc32 of all that follows it | u32 crc32 of the output
            | u32 header length | header | sections          (little-endian)

The header (raw LZMA2, fixed settings) is JSON ``{"n": output bytes, "s": [[compressed bytes,
raw bytes, lc, lp, pb, log2 dict size], ...], "k": skeleton section, "c": [[offset, length], ...],
"t": [tensor, ...]}``. ``c`` lists the byte ranges of the output that are *not* in the skeleton
(sorted, disjoint); the skeleton is the rest of the output in order. Each section is its own raw
LZMA2 stream. Tensors, each filling one or two cut ranges:

- ``{"m": "sparse", "o": offset, "n": bytes, "r": runs section, "v": values section}``: int8
  buffer, its non-zero bytes at the positions given by the zero runs;
- ``{"m": "shared", "o", "n", "r", "rows": channels, "i": index section (uint8), "cb": codebook
  section (float32 LE), "x": exceptions section or -1, "sc": scales}``: as above, each value
  taken from the codebook through the row's scale. ``sc`` is ``{"o": offset}`` when the scales
  (float32 LE, one per row) are in the skeleton, or ``{"o", "d": divisor, "e": uint32 bits for
  rows without weights, "x": section of (u32 row, u32 bits) pairs overriding predictions or -1}``
  when they are recomputed. Exceptions ``x`` are u32 positions then int8 values.

Zero runs (the zeros before each stored value) are bytes in base 255 (``encode_runs``, also used by the
host's encoder, ``pipeline/algorithms/transport_codec.py``, and the Piggyback mask codec): each 255 adds
255 to the run, the first byte below 255 ends it.
"""

import json
import lzma
import struct
import zlib

import numpy as np

MAGIC = b"EDGT"
VERSION = 1
_HEAD = struct.Struct("<4sBIII")
HEADER_FILTER = {"lc": 3, "lp": 0, "pb": 0, "dict_log": 16}
MAX_OUTPUT = 1 << 32  # model files up to 4 GiB
MAX_HEADER = 16 << 20
MAX_SECTIONS = 1 << 16
# What a model file of n bytes may need, in all (checked before anything is decompressed): its
# sections (skeleton, zero runs, values, indices, codebooks, exceptions) and its header.
SECTIONS_PER_OUTPUT_BYTE = 8
HEADER_PER_OUTPUT_BYTE = 64
SLACK = 1 << 16


def sections_bound(n):
    """The most bytes all sections of a payload for an ``n``-byte file may decode to."""
    return SECTIONS_PER_OUTPUT_BYTE * n + SLACK


def header_bound(n):
    """The most bytes the header of a payload for an ``n``-byte file may decode to."""
    return min(MAX_HEADER, HEADER_PER_OUTPUT_BYTE * n + SLACK)


class TransportError(ValueError):
    """The payload is not a transport payload, is damaged, or does not decode."""


def is_transport(payload):
    return bytes(payload[:4]) == MAGIC


def lzma_filters(lc, lp, pb, dict_log):
    return [{"id": lzma.FILTER_LZMA2, "lc": lc, "lp": lp, "pb": pb, "dict_size": 1 << dict_log}]


def decompress_section(data, raw_len, lc, lp, pb, dict_log):
    if not (0 <= lc <= 4 and 0 <= lp <= 4 and 0 <= pb <= 4 and 12 <= dict_log <= 30):
        raise TransportError("a section has invalid LZMA2 settings")
    if not isinstance(raw_len, int) or isinstance(raw_len, bool) or raw_len < 0:
        raise TransportError("a section has an invalid length")
    out = _bounded_decompress(data, lzma_filters(lc, lp, pb, dict_log), raw_len)
    if len(out) != raw_len:
        raise TransportError("a section decodes to %d bytes, expected %d" % (len(out), raw_len))
    return out


def _bounded_decompress(data, filters, max_len):
    """Raw LZMA2 -> at most ``max_len`` + 1 bytes (a section never inflates past what its header says)."""
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=filters)
    out = d.decompress(bytes(data), max_length=max_len + 1)
    if len(out) > max_len:
        raise TransportError("a section decodes to more than %d bytes" % max_len)
    return out


def encode_runs(positions):
    """Zero runs before each of the sorted flat ``positions``, as base-255 bytes."""
    positions = np.asarray(positions, dtype=np.int64)
    runs = np.diff(positions, prepend=-1) - 1
    out = np.full(int(np.sum(runs // 255)) + len(runs), 255, dtype=np.uint8)
    ends = np.cumsum(runs // 255 + 1) - 1
    out[ends] = runs % 255
    return out.tobytes()


def decode_runs(data):
    digits = np.frombuffer(data, dtype=np.uint8)
    if len(digits) and digits[-1] == 255:
        raise TransportError("zero runs end inside a run")
    ends = np.flatnonzero(digits != 255)
    runs = 255 * (np.diff(ends, prepend=-1) - 1) + digits[ends].astype(np.int64)
    return np.cumsum(runs + 1) - 1


def codebook_table(codebook, scales):
    """int8 value of codebook entry ``k`` in row ``r``: ``rint(codebook[k] / scales[r])``, float32."""
    codebook = np.asarray(codebook, dtype=np.float32)
    scales = np.asarray(scales, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.rint(codebook[None, :] / scales[:, None])
    q = np.where(np.isfinite(q), q, 0)
    return np.clip(q, -128, 127).astype(np.int8)


def predict_scales(codebook, index, rows_of, rows, divisor, empty_bits):
    """Per-row scale ``max |codebook value used in the row| / divisor`` (float32); ``empty_bits``
    (the float32's bits) for rows that store no weight."""
    codebook = np.asarray(codebook, dtype=np.float32)
    amax = np.zeros(rows, dtype=np.float32)
    if len(index):
        np.maximum.at(amax, rows_of, np.abs(codebook[index]))
    scales = amax / np.float32(divisor)
    scales[amax == 0] = np.array([empty_bits], dtype="<u4").view("<f4")[0]
    return scales.astype("<f4")


def _section_specs(body, specs, max_total):
    """The section specs, checked before anything is decompressed: at most MAX_SECTIONS, each within
    the payload, their decoded sizes together at most ``max_total``."""
    if not isinstance(specs, list) or len(specs) > MAX_SECTIONS:
        raise TransportError("payload header lists more than %d sections" % MAX_SECTIONS)
    offset = total = 0
    for spec in specs:
        if not isinstance(spec, list) or len(spec) != 6 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in spec):
            raise TransportError("payload header has a malformed section")
        zlen, raw_len = spec[0], spec[1]
        if zlen < 0 or raw_len < 0 or offset + zlen > len(body):
            raise TransportError("payload is truncated")
        offset += zlen
        total += raw_len
        if total > max_total:
            raise TransportError("payload sections claim more than %d bytes, more than a model file of this size "
                                 "can need" % max_total)
    if offset != len(body):
        raise TransportError("payload has %d trailing bytes" % (len(body) - offset))
    return specs


def _sections(body, specs, max_total):
    sections, offset = [], 0
    for zlen, raw_len, lc, lp, pb, dict_log in _section_specs(body, specs, max_total):
        sections.append(decompress_section(body[offset:offset + zlen], raw_len, lc, lp, pb, dict_log))
        offset += zlen
    return sections


def decode(payload, max_size=None):
    """The model file ``payload`` encodes (bytes); TransportError if it is damaged.

    ``max_size``: the largest model file accepted (verify passes the size the manifest records).
    Everything is bounded by it before it is allocated: the header decodes to at most
    ``header_bound(max_size)`` bytes, the file size it declares is at most ``max_size``, and its
    sections together to at most ``sections_bound`` of that size (each decompressed bounded by what
    the header declares)."""
    payload = bytes(payload)
    if len(payload) < _HEAD.size or not is_transport(payload):
        raise TransportError("not an edgec transport payload (bad magic)")
    magic, version, payload_crc, crc, header_len = _HEAD.unpack_from(payload)
    if version != VERSION:
        raise TransportError("transport payload version %d is not supported (this decoder reads %d)" % (version, VERSION))
    if zlib.crc32(payload[9:]) != payload_crc:
        raise TransportError("payload fails its crc32 check (damaged in transfer?)")
    limit = MAX_OUTPUT if max_size is None else min(int(max_size), MAX_OUTPUT)
    try:
        h = HEADER_FILTER
        raw_header = _bounded_decompress(payload[_HEAD.size:_HEAD.size + header_len],
                                         lzma_filters(h["lc"], h["lp"], h["pb"], h["dict_log"]), header_bound(limit))
        header = json.loads(raw_header)
        if not isinstance(header, dict):
            raise TransportError("payload header is not an object")
        n = header.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= limit:
            raise TransportError("payload decodes to %r bytes, more than the %d allowed" % (n, limit))
        _check_layout(header, n)
        sections = _sections(payload[_HEAD.size + header_len:], header["s"], sections_bound(n))
        out = _assemble(header, sections)
    except TransportError:
        raise
    except Exception as e:  # a damaged payload can fail anywhere (lzma, JSON, numpy): one error type
        raise TransportError("payload does not decode (%s: %s)" % (type(e).__name__, e))
    if zlib.crc32(out) != crc:
        raise TransportError("decoded file fails its crc32 check")
    return out


def _check_layout(header, size):
    """Cut ranges and tensors, bounded before anything is allocated for them: at most MAX_SECTIONS
    of each, the tensors together no bigger than the file."""
    cuts, tensors = header.get("c"), header.get("t")
    if not isinstance(cuts, list) or not isinstance(tensors, list):
        raise TransportError("payload header has no cut or tensor list")
    if len(cuts) > MAX_SECTIONS or len(tensors) > MAX_SECTIONS:
        raise TransportError("payload header lists more than %d cuts or tensors" % MAX_SECTIONS)
    total = 0
    for t in tensors:
        n = t.get("n") if isinstance(t, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise TransportError("payload header has a malformed tensor")
        total += n
    if total > size:
        raise TransportError("payload tensors fill %d bytes of a %d-byte file" % (total, size))


def _section(sections, i):
    return b"" if i < 0 else sections[i]


def _assemble(header, sections):
    size = int(header["n"])
    skeleton = sections[header["k"]]
    pos = 0
    for offset, length in header["c"]:
        if offset < pos or length < 0 or offset + length > size:
            raise TransportError("cut ranges overlap or run past the end")
        pos = offset + length
    kept = size - sum(length for _, length in header["c"])
    if len(skeleton) != kept:
        raise TransportError("skeleton is %d bytes, the cuts leave %d" % (len(skeleton), kept))
    out = bytearray(size)
    pos = src = 0
    for offset, length in header["c"]:
        out[pos:offset] = skeleton[src:src + offset - pos]
        src += offset - pos
        pos = offset + length
    out[pos:] = skeleton[src:]
    for t in header["t"]:
        _fill_tensor(out, t, sections)
    if len(out) != size:
        raise TransportError("decoded file is %d bytes, expected %d" % (len(out), size))
    return bytes(out)


def _fill_tensor(out, t, sections):
    n, o = int(t["n"]), int(t["o"])
    if not (0 <= n <= len(out) and 0 <= o <= len(out) - n):
        raise TransportError("a tensor lies outside the decoded file")
    positions = decode_runs(_section(sections, t["r"]))
    if len(positions) and (positions[-1] >= n or positions[0] < 0):
        raise TransportError("a stored position lies outside its tensor")
    values = np.zeros(n, dtype=np.int8)
    if t["m"] == "sparse":
        stored = np.frombuffer(_section(sections, t["v"]), dtype=np.int8)
        if len(stored) != len(positions):
            raise TransportError("sparse tensor: %d values for %d positions" % (len(stored), len(positions)))
        values[positions] = stored
    elif t["m"] == "shared":
        rows = int(t["rows"])
        if rows < 1 or n % rows:
            raise TransportError("shared tensor: %d bytes do not split into %d rows" % (n, rows))
        index = np.frombuffer(_section(sections, t["i"]), dtype=np.uint8).astype(np.int64)
        codebook = np.frombuffer(_section(sections, t["cb"]), dtype="<f4")
        if len(index) != len(positions) or (len(index) and int(index.max()) >= len(codebook)):
            raise TransportError("shared tensor: indices do not match its positions or codebook")
        rows_of = positions // (n // rows)
        sc = t["sc"]
        if "d" in sc:
            scales = predict_scales(codebook, index, rows_of, rows, sc["d"], sc["e"])
            fixes = np.frombuffer(_section(sections, sc["x"]), dtype="<u4").reshape(-1, 2)
            if len(fixes) and int(fixes[:, 0].max()) >= rows:
                raise TransportError("shared tensor: a scale fix names a row outside the tensor")
            scales.view("<u4")[fixes[:, 0]] = fixes[:, 1]
            out[sc["o"]:sc["o"] + 4 * rows] = scales.tobytes()
        else:
            scales = np.frombuffer(bytes(out[sc["o"]:sc["o"] + 4 * rows]), dtype="<f4")
        values[positions] = codebook_table(codebook, scales)[rows_of, index]
        fix = _section(sections, t["x"])
        if fix:
            count = len(fix) // 5
            where = np.frombuffer(fix[:4 * count], dtype="<u4")
            if len(fix) != 5 * count or (count and int(where.max()) >= n):
                raise TransportError("shared tensor: bad exception list")
            values[where] = np.frombuffer(fix[4 * count:], dtype=np.int8)
    else:
        raise TransportError("unknown tensor encoding %r" % t["m"])
    out[o:o + n] = values.tobytes()


def decode_file(src, dst):
    with open(src, "rb") as f:
        data = decode(f.read())
    with open(dst, "wb") as f:
        f.write(data)
    return len(data)


def main(argv=None):
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m edgec_ondevice.transport PAYLOAD MODEL_FILE_OUT", file=sys.stderr)
        return 2
    try:
        n = decode_file(args[0], args[1])
    except (OSError, TransportError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    print("%s -> %s (%d bytes)" % (args[0], args[1], n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
