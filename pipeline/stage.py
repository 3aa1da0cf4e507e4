"""The stage protocol.

A stage kind is a pydantic config plus two methods: ``check`` (run for the whole chain before any
work, against the real model, the data, the target and what the stage before produces) and ``run``
(read the input artifact, write a new one). Subclassing :class:`Stage` with a ``kind`` registers it
(Olive-style): there is no hand-kept list of stages. A config may list several instances of one
kind, told apart by ``id``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from torch import nn

from edgec.architecture import ModelTrust
from edgec.data import Dataset

from .artifact import MODEL, Artifact


class Strict(BaseModel):
    """Base for config models: unknown keys are errors, inf/nan are refused, values are validated on
    assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StageConfig(Strict):
    """Keys every stage instance accepts besides its kind's own."""

    data: str | None = Field(None, description="named dataset ([data.NAME]) this stage reads; default: the main data")


@dataclass(frozen=True)
class StageContext:
    """Everything a stage may read besides its input artifact."""

    data: Dataset  # the data set this stage reads
    seed: int
    target: Any  # edgec.targets.profile.TargetProfile
    console: Console
    trust: ModelTrust = ModelTrust()
    # Multi-task builds ([[tasks]]): every loaded data set by name ("main" included) and each task's
    # data set name, so a stage can read the data of tasks other than its own (export, learn).
    datasets: Mapping[str, Dataset] = field(default_factory=dict)
    tasks: Mapping[str, str] = field(default_factory=dict)
    # The accuracy budget in points (pipeline/accuracy_budget.py): stages without an explicit setting spend their share
    budget_pt: float = 1.0
    cache: Any = None  # the build's StageCache (pipeline/cache.py): for sub-results a stage keeps, e.g. latency tables


@dataclass(frozen=True)
class Probe:
    """What a stage's ``check`` sees: the model its predecessor will produce (built for real and run
    on a sample), the architecture record, the artifact kind and the stage's data and target."""

    kind: str
    model: nn.Module | None
    arch: dict[str, Any] | None
    data: Dataset
    target: Any
    trust: ModelTrust
    datasets: Mapping[str, Dataset] = field(default_factory=dict)  # as StageContext.datasets
    tasks: Mapping[str, str] = field(default_factory=dict)  # as StageContext.tasks
    extensions: Mapping[str, Any] = field(default_factory=dict)  # the checkpoint's stage state (Checkpoint.extensions)

    def sample(self, n: int = 2) -> torch.Tensor:
        return torch.from_numpy(self.data.to_input(self.data.x_train[:n]))

    def outputs(self, model: nn.Module | None = None) -> torch.Tensor:
        model = model if model is not None else self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(self.sample())
        finally:
            model.train(was_training)

    def evolve(self, **changes) -> Probe:
        return replace(self, **changes)


class Stage(ABC):
    kind: ClassVar[str]
    version: ClassVar[int] = 1  # bump when the stage's output changes for the same inputs
    consumes: ClassVar[str] = MODEL
    produces: ClassVar[str] = MODEL
    target_dependent: ClassVar[bool] = False
    keeps_weights: ClassVar[bool] = False  # may follow qat (whose int8 ranges fit the weights it trained)
    Config: ClassVar[type[StageConfig]]

    registry: ClassVar[dict[str, type[Stage]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            Stage.registry[cls.kind] = cls

    def __init__(self, config: StageConfig, id: str | None = None):
        self.config = config
        self.id = id or self.kind

    def check(self, probe: Probe) -> Probe:
        """Validate this stage against what it will receive; return what it will produce. Raise
        ConfigError/InputError with a message a user can act on. Must be cheap: no training."""
        return probe

    def key_material(self, ctx: StageContext) -> dict[str, Any]:
        """What besides the input digest decides this stage's output (hashed into the cache key)."""
        material = {
            "stage": self.kind,
            "version": self.version,
            "config": self.config.model_dump(mode="json", exclude={"data"}),
            "data": ctx.data.digest,
            "seed": ctx.seed,
        }
        if self.target_dependent:
            material["target"] = ctx.target.model_dump(mode="json")
        return material

    @abstractmethod
    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        """Read ``source``, write the new artifact's files into ``out_dir``, return its info."""
