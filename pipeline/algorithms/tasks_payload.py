"""Writing a tasks transport payload (format and decoder: ``edgec.ondevice.tasks``): the part that
PackNet's levels (``continual.encode_task_models``) and Piggyback's bit masks
(``piggyback.encode_masked_models``) share. Each encoder adds its own sections (levels, bits,
residuals) and names the files it rebuilds from the base; every other file ships whole. The payload
is decoded again before it is returned, so a payload that does not rebuild the files byte for byte
is never kept."""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
from typing import Any, Mapping

import numpy as np

from edgec.base.errors import ExportError
from edgec.ondevice import tasks as fmt

from .transport_codec import compress_section


class TasksPayloadWriter:
    """Compressed sections in the order they are added, and the header that points into them."""

    def __init__(self, base: bytes, base_name: str):
        self.base = base
        self.header: dict[str, Any] = {
            "version": 2, "base": {"file": base_name, "bytes": len(base), "sha256": hashlib.sha256(base).hexdigest()},
            "files": []}
        self._sections: list[bytes] = []
        self._offset = 0

    def add(self, raw: bytes) -> list[int]:
        """Append ``raw`` as a compressed section; its header entry ``[offset, *compression spec]``."""
        return self.add_smallest([({}, raw)])[1]

    def add_smallest(self, candidates: list[tuple[dict[str, Any], bytes]]) -> tuple[dict[str, Any], list[int]]:
        """Of ``(meta, raw)`` candidates coding the same thing, append the one that compresses
        smallest; its ``meta`` and section entry."""
        packed = [(meta, compress_section(raw)) for meta, raw in candidates]
        meta, (z, spec) = min(packed, key=lambda c: len(c[1][0]))
        self._sections.append(z)
        entry = [self._offset, *spec]
        self._offset += len(z)
        return meta, entry

    def finish(self, files: Mapping[str, bytes], rebuilt: Mapping[str, dict[str, Any]]) -> bytes:
        """The payload: each of ``files`` either rebuilt from the base (``rebuilt[name]``: its mode and
        index) or shipped whole, then decoded again and compared with ``files``."""
        for name, data in files.items():
            entry = {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            entry.update(rebuilt[name] if name in rebuilt else {"mode": "full", "data": self.add(data)})
            self.header["files"].append(entry)
        head = json.dumps(self.header, separators=(",", ":"), sort_keys=True).encode()
        zhead = lzma.compress(head, format=lzma.FORMAT_RAW, filters=fmt.header_filters())
        payload = struct.pack("<8sII", fmt.TASKS_MAGIC, len(zhead), len(head)) + zhead + b"".join(self._sections)
        if fmt.decode_task_models(payload, self.base) != dict(files):
            raise ExportError("the tasks transport payload does not decode to the task model files; no bundle written")
        return payload


def level_regions(levels: np.ndarray, gap: int = 256) -> list[list[int]]:
    """Byte ranges [start, end) covering every byte whose level is above 1 (gaps up to ``gap`` bytes
    merged): the weight buffers that tasks divide. Outside them every task's file keeps the base."""
    idx = np.flatnonzero(levels > 1)
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > gap)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]]) + 1
    return [[int(a), int(b)] for a, b in zip(starts, ends)]
