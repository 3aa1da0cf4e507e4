"""What flows between stages."""

from __future__ import annotations

from dataclasses import dataclass
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

    def checkpoint(self) -> Checkpoint:
        return load_checkpoint(self.path / CHECKPOINT_FILE)
