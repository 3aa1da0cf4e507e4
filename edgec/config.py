"""Build configuration: ``edgec.toml`` (optional) overridden by CLI flags, validated by pydantic.

Stages are listed as an array of tables, each validated by its kind's config model::

    [[stages]]
    kind = "prune"
    id = "prune-coarse"     # optional: default the kind, then kind-2, kind-3 ...
    sparsity = 0.5

The shorthand ``stages = ["train", "prune", ...]`` with one ``[prune]`` table per kind is
translated into that list. Unknown keys are rejected with the stage id and dotted key, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgec.base.locations import default_cache_dir
from edgec.pipeline.stage import Stage, StageConfig, Strict
from edgec.pipeline.stages import DEFAULT_STAGES

from .base.data import BUILTIN_DATASETS
from .base.errors import ConfigError
from .base.suggest import did_you_mean
from .base.tomlfile import read_toml

DEFAULT_CONFIG_FILE = Path("edgec.toml")
DEFAULT_OUT = Path("edgec-out")
MAIN_DATA = "main"
_ID = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class DataSpec(Strict):
    source: str | None = Field(None, description="digits | mnist:DIR | npz:FILE | folder:DIR (named data: default the main source)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="part of the train split held out for validation")
    image_size: int | None = Field(None, ge=1, le=4096, description="folder: resize images to this square size")
    classes: list[int] | None = Field(None, description="keep these classes, relabelled 0..k-1 in this order")
    permute: int | None = Field(None, ge=0, le=2**32 - 1, description="a fixed permutation of the input features, by this seed")
    normal: list[int] | None = Field(None, description="task = reconstruction on labelled data: train on these classes; "
                                     "the test split's other classes are marked anomalous")
    input_noise: float = Field(0.0, ge=0, description="task = reconstruction: std of Gaussian noise on training inputs "
                               "(denoising autoencoder)")


class DataConfig(DataSpec):
    """The main data set; ``[data.NAME]`` sub-tables declare more, which stages name with ``data``."""

    source: str = "digits"
    named: dict[str, DataSpec] = Field(default_factory=dict, description="[data.NAME] tables")

    @model_validator(mode="before")
    @classmethod
    def _collect_named(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            named = {k: v for k, v in raw.items() if isinstance(v, dict) and k != "named"}
            raw = {k: v for k, v in raw.items() if k not in named}
            raw.setdefault("named", {}).update(named)
            bad = [k for k in raw["named"] if not _ID.match(k) or k == MAIN_DATA]
            if bad:
                raise ValueError(f"dataset name {bad[0]!r} must be lowercase letters, digits, '-' or '_' (and not 'main')")
        return raw


class ModelConfig(Strict):
    name: str | None = Field("cnn-small", description="zoo name or package.module:factory (unset: cnn-small for "
                             "images, mlp for flat features)")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the zoo model or factory")
    weights: Path | None = Field(None, description="initial weights: edgec checkpoint or plain state dict")


class TaskSpec(Strict):
    """One task of a multi-task build: its name and the data set that defines its labels."""

    name: str = Field(description="task name (lowercase letters, digits, '-', '_')")
    data: str = Field(MAIN_DATA, description="named dataset ([data.NAME]) with this task's samples and labels, or 'main'")

    @model_validator(mode="after")
    def _name(self):
        if not _ID.match(self.name):
            raise ValueError(f"task name {self.name!r} must be lowercase letters, digits, '-' or '_'")
        return self


class StageSpec(BaseModel):
    """One stage instance: its kind, unique id and validated config."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    kind: str
    id: str
    config: StageConfig

    def instantiate(self) -> Stage:
        return Stage.registry[self.kind](self.config, self.id)

    def canonical(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, **self.config.model_dump(mode="json")}


class BudgetConfig(Strict):
    """[budget]: how much of the trained model's validation metric the bundle may lose (pipeline/accuracy_budget.py)."""

    max_accuracy_drop: float | None = Field(None, ge=0, le=100, description="points of the trained model's validation "
                                            "metric the bundle may lose; default the target's [budget], else 1.0")
    enforce: bool = Field(True, description="false: record and report the drop but publish a bundle over the budget")


class BuildConfig(Strict):
    target: str = "rpi"
    task: Literal["classification", "reconstruction", "regression"] = Field(
        "classification", description="what the model learns: class labels, its own input (autoencoder), float targets")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    out: Path = DEFAULT_OUT
    cache_dir: Path = Field(default_factory=default_cache_dir)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stages: list[StageSpec] = Field(default_factory=list)
    tasks: list[TaskSpec] = Field(default_factory=list, description="[[tasks]]: several tasks served by one model")
    sign_key: Path | None = Field(None, description="Ed25519 private key (edgec keys generate) that signs the bundle")
    budget: BudgetConfig = BudgetConfig()

    def canonical(self) -> dict[str, Any]:
        """The resolved config in list form (what --print-config prints and build.json records)."""
        out = self.model_dump(mode="json", exclude={"stages", "data"})
        data = self.data.model_dump(mode="json", exclude={"named"})
        data.update({k: v.model_dump(mode="json") for k, v in self.data.named.items()})
        return {**out, "data": data, "stages": [s.canonical() for s in self.stages]}

    def stage(self, id: str) -> StageSpec:
        return next(s for s in self.stages if s.id == id)


@dataclass(frozen=True)
class Overrides:
    """What the command line changes: dotted keys (``--set``, where the first part may be a stage
    id), per-kind keys (``--precision`` sets every export stage's), and a stage selection."""

    keys: dict[str, Any]
    per_kind: dict[str, dict[str, Any]]
    stages: list[str] | None = None


def load_config(path: Path | None, overrides: Overrides | dict[str, Any] | None = None) -> BuildConfig:
    """Read ``path`` (or ./edgec.toml when present), apply CLI overrides, validate everything."""
    if not isinstance(overrides, Overrides):
        overrides = Overrides(dict(overrides or {}), {})
    raw: dict[str, Any] = {}
    file = path if path is not None else (DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None)
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if file is not None:
        raw = read_toml(file)
    return parse_config(raw, overrides, origin=f"{file}: " if file else "")


def parse_config(raw: dict[str, Any], overrides: Overrides | None = None, origin: str = "") -> BuildConfig:
    overrides = overrides or Overrides({}, {})
    try:
        raw, overrides = _stage_list_override(raw, overrides)
        tables = _stage_tables(dict(raw), overrides)
        specs = _validate_stages(tables)
        top = {k: v for k, v in raw.items() if k != "stages" and k not in Stage.registry}
        for dotted, value in overrides.keys.items():
            if dotted.split(".")[0] not in Stage.registry and dotted.split(".")[0] not in {s.id for s in specs}:
                _set_dotted(top, dotted, value)
        source = top["data"].get("source") if isinstance(top.get("data"), dict) else None
        if "task" not in top and isinstance(source, str) and source in BUILTIN_DATASETS:
            top["task"] = BUILTIN_DATASETS[source]  # a named built-in data set carries its task
        config = _validate(BuildConfig, {**top, "stages": specs}, "")
    except ConfigError as e:
        raise ConfigError(f"{origin}{e}") from None
    for spec in config.stages:
        if spec.config.data is not None and spec.config.data not in config.data.named:
            raise ConfigError(f"{origin}stage {spec.id!r}: data {spec.config.data!r} is not declared"
                              f"{did_you_mean(spec.config.data, config.data.named)}; add a [data.{spec.config.data}] "
                              f"table (declared: {', '.join(config.data.named) or 'none'})")
    names = [t.name for t in config.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{origin}[[tasks]]: task names must be unique, got {names}")
    for spec in [config.data, *config.data.named.values()]:
        if config.task != "reconstruction" and (spec.normal is not None or spec.input_noise):
            raise ConfigError(f"{origin}data.normal and data.input_noise apply to task = \"reconstruction\" "
                              f"(this build's task is {config.task!r})")
        if config.task != "classification" and spec.classes is not None:
            raise ConfigError(f"{origin}data.classes applies to task = \"classification\" (for an autoencoder, "
                              "data.normal names the normal classes)")
    for task in config.tasks:
        if task.data != MAIN_DATA and task.data not in config.data.named:
            raise ConfigError(f"{origin}task {task.name!r}: data {task.data!r} is not declared; add a [data.{task.data}] table")
    return config


def _stage_list_override(raw: dict[str, Any], overrides: Overrides) -> tuple[dict[str, Any], Overrides]:
    """``--set stages=[...]`` replaces the config's stage list (kinds or inline tables), exactly as
    ``stages = [...]`` in the file would; a key below it (``--set stages.0.x``) has no meaning."""
    keys = dict(overrides.keys)
    nested = next((k for k in keys if k.startswith("stages.")), None)
    if nested is not None:
        raise ConfigError(f"--set {nested}: address a stage by its id or kind (--set train.epochs=3); set the list with "
                          "--set stages=[...], --stages ids or the config file's stages")
    if "stages" not in keys:
        return raw, overrides
    return {**raw, "stages": keys.pop("stages")}, dataclasses.replace(overrides, keys=keys)


def _stage_tables(raw: dict[str, Any], overrides: Overrides) -> list[dict[str, Any]]:
    """The stage list as tables with kind and id, shorthand translated, overrides applied."""
    listed = raw.get("stages", DEFAULT_STAGES)
    if not isinstance(listed, list):
        raise ConfigError("stages must be a list: stage kinds, or [[stages]] tables")
    list_form = any(isinstance(s, dict) for s in listed)
    if not list_form:
        # Shorthand: one table per kind; overrides address kinds. Sections of kinds not listed are
        # still validated (a typo there is still a typo) but not run.
        sections = {kind: dict(raw.get(kind) or {}) for kind in Stage.registry}
        for dotted, value in overrides.keys.items():
            head, _, rest = dotted.partition(".")
            if head in sections and rest:
                _set_dotted(sections[head], rest, value)
        for kind, keys in overrides.per_kind.items():
            for dotted, value in keys.items():
                _set_dotted(sections[kind], dotted, value)
        names = overrides.stages if overrides.stages is not None else listed
        for name in names:
            if not isinstance(name, str) or name not in Stage.registry:
                raise ConfigError(f"unknown stage {name!r}{did_you_mean(name, Stage.registry)} in stages: use {', '.join(Stage.registry)}")
        for kind in set(Stage.registry) - set(names):
            _validate(Stage.registry[kind].Config, sections[kind], f"[{kind}]")
        return _assign_ids([{"kind": name, **sections[name]} for name in names])
    stray = [k for k in Stage.registry if k in raw]
    if stray:
        raise ConfigError(f"[{stray[0]}] applies to the shorthand stages list; with [[stages]] tables put its keys in the "
                          f"table of that stage")
    if not all(isinstance(s, dict) for s in listed):
        raise ConfigError("stages mixes names and tables; use [[stages]] tables throughout")
    tables = _assign_ids([dict(s) for s in listed])
    by_id = {t["id"]: t for t in tables}
    for dotted, value in overrides.keys.items():
        head, _, rest = dotted.partition(".")
        if head in by_id and rest:
            _set_dotted(by_id[head], rest, value)
        elif head in Stage.registry:
            raise ConfigError(f"--set {dotted}: no stage has id {head!r}{did_you_mean(head, by_id)}; ids: {', '.join(by_id)}")
    for table in tables:
        for dotted, value in overrides.per_kind.get(table["kind"], {}).items():
            _set_dotted(table, dotted, value)
    if overrides.stages is not None:
        unknown = [s for s in overrides.stages if s not in by_id]
        if unknown:
            raise ConfigError(f"--stages {unknown[0]!r}: no stage with that id in the config{did_you_mean(unknown[0], by_id)}; ids: {', '.join(by_id)}")
        tables = [t for t in tables if t["id"] in overrides.stages]
    return tables


def _assign_ids(tables: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, int] = {}
    ids: set[str] = set()
    for i, table in enumerate(tables):
        kind = table.get("kind")
        if kind not in Stage.registry:
            raise ConfigError(f"stages[{i}]: kind {kind!r} is not a stage{did_you_mean(kind, Stage.registry)}; use one of {', '.join(Stage.registry)}")
        seen[kind] = seen.get(kind, 0) + 1
        default = kind if seen[kind] == 1 else f"{kind}-{seen[kind]}"
        stage_id = table.setdefault("id", default)
        if not isinstance(stage_id, str) or not _ID.match(stage_id):
            raise ConfigError(f"stages[{i}]: id {stage_id!r} must be lowercase letters, digits, '-' or '_', starting with a letter")
        if stage_id in BuildConfig.model_fields or stage_id in ids:
            raise ConfigError(f"stages[{i}]: id {stage_id!r} is {'used twice' if stage_id in ids else 'a reserved key'}; "
                              "give each stage a unique id")
        ids.add(stage_id)
    return tables


def _validate_stages(tables: list[dict[str, Any]]) -> list[StageSpec]:
    specs = []
    for table in tables:
        kind, stage_id = table["kind"], table["id"]
        fields = {k: v for k, v in table.items() if k not in ("kind", "id")}
        config = _validate(Stage.registry[kind].Config, fields, f"stage {stage_id!r}")
        specs.append(StageSpec(kind=kind, id=stage_id, config=config))
    return specs


def _validate(model: type[BaseModel], raw: dict[str, Any], where: str):
    if issubclass(model, StageConfig):
        model = model.config_class(raw)  # a kind with one config per mode: the mode's (its keys for the hints)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        dotted = ".".join(str(p) for p in err["loc"])
        prefix = f"{where}: " if where else ""
        if err["type"] == "extra_forbidden":
            hint = did_you_mean(str(err["loc"][-1]), _keys_at(model, err["loc"][:-1]))
            raise ConfigError(f"{prefix}unknown key {dotted!r}{hint}; see `edgec build --print-config` for valid keys") from None
        where_key = f"{dotted}: " if dotted else ""
        got = repr(err.get("input"))
        # a validator's own message often names the value; a whole table's (a model validator's) is not shown
        shown = "" if got in err["msg"] or not err["loc"] else f" (got {got})"
        raise ConfigError(f"{prefix}{where_key}{err['msg']}{shown}") from None


def _keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a config model accepts at ``loc`` (a path of nested model fields); [] past a non-model."""
    for part in loc:
        field = model.model_fields.get(str(part))
        nested = [t for t in (field.annotation, *typing.get_args(field.annotation)) if isinstance(t, type)
                  and issubclass(t, BaseModel)] if field else []
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _set_dotted(node: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a table")
        node = child
    node[leaf] = value
