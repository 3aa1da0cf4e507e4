"""Binary masks as the positions where they differ from a reference mask (Piggyback's task masks).

numpy + stdlib only, relative imports (this package ships inside every bundle).

A task mask keeps most weights, so it is coded as its *flips*: the positions where it differs from
a reference (all ones, or the previous task's mask), in one of two codings; the encoder keeps
whichever compresses smaller (the tasks payload LZMA-compresses every section):

* ``bits``: the flips as packed bits (``np.packbits``, ``ceil(P / 8)`` bytes for P positions);
* ``runs``: the unflipped positions before each flip, in base 255 (``transport.encode_runs``, the
  zero runs of the sparse weight coding), at most ``count + P // 255`` bytes.

The decoder checks the declared sizes before it allocates from them.
"""

import numpy as np

from .transport import TransportError, decode_runs, encode_runs

CODINGS = ("bits", "runs")


def encode(flips, coding):
    """``flips`` (bool array) in ``coding``: ``(bytes, number of flips)``."""
    flips = np.asarray(flips, dtype=bool).reshape(-1)
    raw = np.packbits(flips).tobytes() if coding == "bits" else encode_runs(np.flatnonzero(flips))
    return raw, int(flips.sum())


def max_coded_bytes(coding, count, length):
    """The most bytes ``count`` flips of ``length`` positions take in ``coding`` (TransportError when
    the coding or the numbers are malformed): the bound a decoder reads up to."""
    if coding not in CODINGS or not _is_int(count) or not _is_int(length) or not 0 <= count <= length:
        raise TransportError("a mask's coding or flip count is malformed")
    return (length + 7) // 8 if coding == "bits" else count + length // 255 + 1


def decode(raw, coding, count, length):
    """The boolean flips (``length`` positions, ``count`` of them set) that ``raw`` codes;
    TransportError when ``raw`` is not exactly such a coding."""
    if len(raw) > max_coded_bytes(coding, count, length):
        raise TransportError("a mask's coded flips are longer than its flip count allows")
    if coding == "bits":
        b = np.frombuffer(raw, dtype=np.uint8)
        if len(b) != (length + 7) // 8 or np.any(np.unpackbits(b)[length:]):
            raise TransportError("a packed mask has the wrong length")
        flips = np.unpackbits(b, count=length).astype(bool)
    else:
        positions = decode_runs(raw)
        if len(positions) != count or (count and positions[-1] >= length):
            raise TransportError("a mask's flip runs do not give its %d flips inside its %d positions" % (count, length))
        flips = np.zeros(length, dtype=bool)
        flips[positions] = True
    if int(flips.sum()) != count:
        raise TransportError("a packed mask does not hold its declared %d flips" % count)
    return flips


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)
