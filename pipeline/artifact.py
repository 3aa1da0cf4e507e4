"""What flows between stages, and reading its files back against their authenticated sha256s."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgec.base.checkpoint import Checkpoint, load_checkpoint
from edgec.base.errors import RunError

MODEL = "model"  # a folder with model.pt (edgec checkpoint)
BUNDLE = "bundle"  # a folder laid out as a deployable bundle (see docs/design.md)

CHECKPOINT_FILE = "model.pt"


@dataclass(frozen=True)
class Artifact:
    """A read-only cache entry. Stages read it and write a new one; they never modify it."""

    kind: str
    path: Path
    digest: str
    info: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # {relative path: sha256}, authenticated by the cache

    def checkpoint(self) -> Checkpoint:
        """The model, read once and checked against the authenticated sha256 (a file swapped in
        the cache after it was served is refused)."""
        return load_checkpoint(self.path / CHECKPOINT_FILE, read_verified(self, CHECKPOINT_FILE))


class ChangedInCache(RunError):
    """A served entry's file no longer has its authenticated content (someone wrote to the cache)."""

    def __init__(self, artifact: Artifact, name: str):
        super().__init__(f"{artifact.path / name} changed in the stage cache after it was checked (another process "
                         "writes to the cache); it was not used: rerun the build")


def read_verified(artifact: Artifact, name: str) -> bytes:
    """The bytes of ``artifact``'s file ``name``, checked against its authenticated sha256: a file
    replaced in the cache after ``get`` is refused (CorruptEntry), never used."""
    expected = artifact.files.get(name)
    if expected is None:
        raise ChangedInCache(artifact, name)
    data = (artifact.path / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise ChangedInCache(artifact, name)
    return data


def copy_verified(artifact: Artifact, name: str, dest: Path) -> None:
    """Copy one authenticated file of ``artifact`` to ``dest``, checking each byte copied."""
    expected = artifact.files.get(name)
    if expected is None:
        raise ChangedInCache(artifact, name)
    h = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (artifact.path / name).open("rb") as src, dest.open("wb") as dst:
        while block := src.read(1 << 20):
            h.update(block)
            dst.write(block)
        mode = os.fstat(src.fileno()).st_mode
    if h.hexdigest() != expected:
        raise ChangedInCache(artifact, name)
    if mode & stat.S_IXUSR:
        os.chmod(dest, 0o755)


def copy_artifact_verified(artifact: Artifact, dest: Path) -> None:
    """Copy every authenticated file of ``artifact`` (and nothing else) under ``dest``."""
    for name in artifact.files:
        copy_verified(artifact, name, dest / name)
