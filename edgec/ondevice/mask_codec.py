"""Binary masks as the positions where they differ from a reference mask (Piggyback's task masks).

numpy + stdlib only, relative imports (this package ships inside every bundle).

A task mask keeps most weights, so it is coded as its *flips*: the positions where it differs from
a reference (all ones, or the previous task's mask), in one of two codings; the encoder keeps
whichever compresses smaller (the tasks payload LZMA-compresses every section):

* ``bits``: the flips as packed bits (``np.packbits``, ``ceil(P / 8)`` bytes for P positions);
* ``runs``: the unflipped positions before each flip, in base 255 (``transport.encode_runs``, the
  zero runs of the sparse weight coding), at most ``count + P // 255`` bytes.

and in one of two position orders (``ORDERS``): ``region`` (the order of the bytes in the model file)
or ``magnitude``, the positions grouped by ``|int8 value of the base byte| // 16`` (largest first,
stable inside a group). A task drops large weights far more often than small ones (measured on a
Permuted-MNIST mask: 0.1% of the weights of |q| 5, 7-12% of |q| 40-100), so grouping by magnitude
puts the flips of similar density together and the coded mask is ~9% smaller; the decoder has the
base bytes, so the order costs nothing to send.

The decoder checks the declared sizes before it allocates from them.
"""

import numpy as np

from .transport import TransportError, decode_runs, encode_runs

CODINGS = ("bits", "runs")
ORDERS = ("region", "magnitude")
MAGNITUDE_GROUP = 16  # |int8| values per group of the magnitude order (8 groups)


def encode(flips, coding):
    """``flips`` (bool array) in ``coding``: ``(bytes, number of flips)``."""
    flips = np.asarray(flips, dtype=bool).reshape(-1)
    raw = np.packbits(flips).tobytes() if coding == "bits" else encode_runs(np.flatnonzero(flips))
    return raw, int(flips.sum())


def max_coded_bytes(coding, count, length):
    """The most bytes ``count`` flips of ``length`` positions take in ``coding`` (TransportError when
    the coding or the numbers are malformed): the bound a decoder reads up to."""
    if coding not in CODINGS or not is_int(count) or not is_int(length) or not 0 <= count <= length:
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


def position_order(order, base_bytes):
    """The permutation that puts positions in ``order``, given the base's bytes at those positions
    (TransportError when the order is unknown): ``flips[perm]`` is coded, ``flips[perm] = coded``
    decoded."""
    if order not in ORDERS:
        raise TransportError("a mask's position order is malformed")
    if order == "region":
        return np.arange(len(base_bytes))
    groups = np.abs(np.frombuffer(bytes(base_bytes), dtype=np.int8).astype(np.int16)) // MAGNITUDE_GROUP
    return np.argsort(-groups, kind="stable")


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)
