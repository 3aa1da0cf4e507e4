"""The stage protocol.

A stage is a pydantic config model plus one ``run`` method. It declares the artifact kind it
consumes and produces, so a chain can be validated before any work starts, and whether its result
depends on the target (only then is the target part of its cache key, so target-agnostic work is
shared by every target's build).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from rich.console import Console

from edgec.data import Dataset

from .artifact import MODEL, Artifact


class StageConfig(BaseModel):
    """Base for stage configs: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass
class StageContext:
    """Everything a stage may read besides its input artifact."""

    data: Dataset
    seed: int
    target: Any  # edgec.targets.profile.TargetProfile
    console: Console
    options: dict[str, Any] = field(default_factory=dict)


class Stage(ABC):
    name: ClassVar[str]
    version: ClassVar[int] = 1  # bump when the stage's output changes for the same inputs
    consumes: ClassVar[str] = MODEL
    produces: ClassVar[str] = MODEL
    target_dependent: ClassVar[bool] = False
    Config: ClassVar[type[StageConfig]]

    def __init__(self, config: StageConfig):
        self.config = config

    def key_material(self, ctx: StageContext) -> dict[str, Any]:
        """What besides the input digest decides this stage's output (hashed into the cache key)."""
        material = {
            "stage": self.name,
            "version": self.version,
            "config": self.config.model_dump(mode="json"),
            "data": ctx.data.digest,
            "seed": ctx.seed,
        }
        if self.target_dependent:
            material["target"] = ctx.target.model_dump(mode="json")
        return material

    @abstractmethod
    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        """Read ``source``, write the new artifact's files into ``out_dir``, return its info."""
