"""The stage protocol.

A stage kind is a pydantic config plus two methods: ``check`` (run for the whole chain before any
work, against the real model, the data, the target and what the stage before produces) and ``run``
(read the input artifact, write a new one). Subclassing :class:`Stage` with a ``kind`` registers it
(Olive-style): there is no hand-kept list of stages. A config may list several instances of one
kind, told apart by ``id``.

What the build does differently per kind is declared here too, never by comparing kind strings
elsewhere: whether the stage compresses and how it describes what reaches the bundle
(``compresses``, ``reached_bundle``), the checkpoint extensions it writes and the weight-pinning
ones it may follow (``writes_extensions``, ``accepts_extensions``; names in ``extensions.py``) and
its section of the build report (``report_section``).
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

from edgec.base.architecture import ModelTrust
from edgec.base.data import Dataset

from .artifact import MODEL, Artifact


class Strict(BaseModel):
    """Base for config models: unknown keys are errors, inf/nan are refused, values are validated on
    assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StageConfig(Strict):
    """Keys every stage instance accepts besides its kind's own."""

    data: str | None = Field(None, description="named dataset ([data.NAME]) this stage reads; default: the main data")

    @classmethod
    def config_class(cls, keys: Mapping[str, Any]) -> type[StageConfig]:
        """The config model that validates ``keys``: this one, or for a kind with one config per mode
        (prune) the one of the keys' mode."""
        return cls


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
    # The trained reference the budget counts from (the first train stage's output, else the source
    # model; accuracy_budget.reference_index); None for stages before it. Budgeted stages are judged
    # against its validation figure and put its digest in their key.
    reference: Artifact | None = None
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
    compresses: ClassVar[bool] = False  # the build keeps the model before the first such stage (uncompressed.pt)
    writes_extensions: ClassVar[tuple[str, ...]] = ()  # checkpoint extensions it adds (names: extensions.py)
    accepts_extensions: ClassVar[tuple[str, ...]] = ()  # weight-pinning extensions it may follow (extensions.PINS_WEIGHTS)
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

    def reached_bundle(self, info: dict[str, Any], reached: list[str]) -> list[str]:
        """What reaches the bundle once this stage has run (``info``: what its ``run`` returned), given
        what reached it before (one line per stage, build.json ``reached_bundle``). Default: nothing
        of this stage (training, exporting); a stage that compresses adds a line, one that starts a new
        model (distill) replaces them."""
        return reached

    @classmethod
    def report_section(cls, doc: Any, summary: dict[str, Any], manifest: dict[str, Any] | None) -> None:
        """Add this kind's section to the build report (``edgec.report.document.Doc``; ``summary``:
        build.json, ``manifest``: the bundle's or None). Called once per kind in the build, in chain
        order; default: no section."""

    @abstractmethod
    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        """Read ``source``, write the new artifact's files into ``out_dir``, return its info."""
