"""What flows between stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgec.checkpoint import Checkpoint, load_checkpoint

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
        from .cache import read_verified

        return load_checkpoint(self.path / CHECKPOINT_FILE, read_verified(self, CHECKPOINT_FILE))
