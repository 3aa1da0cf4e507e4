"""Content-addressed stage cache with atomic writes (DVC run-cache style).

An entry is ``<root>/<stage>/<key>/`` with the stage's files and ``entry.json`` (sha256 of every
file, the artifact's kind and info). Entries are built in a temp dir and renamed into place, so a
reader never sees half an entry; an entry whose files no longer match their hashes is discarded
and rebuilt, never served.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .artifact import Artifact

ENTRY_FILE = "entry.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of canonical JSON: the same config always gives the same key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


def _file_table(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ENTRY_FILE
    }


class StageCache:
    def __init__(self, root: Path):
        self.root = root

    def _entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Artifact | None:
        """The verified artifact for (stage, key), or None; a corrupt entry is deleted."""
        folder = self._entry(stage, key)
        if not folder.is_dir():
            return None
        try:
            entry = json.loads((folder / ENTRY_FILE).read_text())
            if _file_table(folder) != entry["files"]:
                raise ValueError("file hashes differ")
            return Artifact(entry["kind"], folder, entry["digest"], entry["info"])
        except (OSError, ValueError, KeyError):
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def put(self, stage: str, key: str, kind: str, build: Callable[[Path], dict[str, Any]]) -> Artifact:
        """Run ``build(tmp_dir) -> info`` and publish its files atomically under (stage, key)."""
        final = self._entry(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
        try:
            info = build(tmp)
            files = _file_table(tmp)
            digest = stable_hash({"kind": kind, "files": files})
            entry = {"kind": kind, "stage": stage, "key": key, "digest": digest, "files": files, "info": info}
            (tmp / ENTRY_FILE).write_text(json.dumps(entry, indent=1, sort_keys=True))
            if final.exists():  # --force, or a stale entry: replace it
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Artifact(kind, final, digest, info)
