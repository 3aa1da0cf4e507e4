"""Build configuration: ``edgec.toml`` (optional) overridden by CLI flags, validated by pydantic.

Unknown keys are rejected with their dotted name, so a typo never silently falls back to a
default. Each stage's section is that stage's own config model.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgec.pipeline.registry import DEFAULT_STAGES, IMPLEMENTED, PLANNED
from edgec.pipeline.distill import DistillConfig
from edgec.pipeline.export import ExportConfig
from edgec.pipeline.prune import PruneConfig
from edgec.pipeline.retrain import RetrainConfig
from edgec.pipeline.share import ShareConfig
from edgec.pipeline.train import TrainConfig

from .errors import ConfigError

DEFAULT_CONFIG_FILE = Path("edgec.toml")
DEFAULT_OUT = Path("edgec-out")


def default_cache_dir() -> Path:
    import os

    env = os.environ.get("EDGEC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "edgec"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    source: str = Field("digits", description="digits | mnist:DIR | npz:FILE | folder:DIR")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="part of the train split held out for validation")
    image_size: int | None = Field(None, ge=1, description="folder: resize images to this square size")


class ModelConfig(_Strict):
    name: str | None = Field("cnn-small", description="zoo name or package.module:factory")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the zoo model or factory")
    weights: Path | None = Field(None, description="initial weights: edgec checkpoint or plain state dict")


class BuildConfig(_Strict):
    target: str = "rpi"
    seed: int = 0
    stages: list[str] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    out: Path = DEFAULT_OUT
    cache_dir: Path = Field(default_factory=default_cache_dir)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    retrain: RetrainConfig = RetrainConfig()
    share: ShareConfig = ShareConfig()
    distill: DistillConfig = DistillConfig()
    export: ExportConfig = ExportConfig()

    def stage_config(self, name: str):
        return getattr(self, name)


def load_config(path: Path | None, overrides: dict[str, Any]) -> BuildConfig:
    """Read ``path`` (or ./edgec.toml when present), apply dotted-key CLI overrides, validate."""
    raw: dict[str, Any] = {}
    file = path if path is not None else (DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None)
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if file is not None:
        try:
            raw = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{file}: not valid TOML ({e})") from None
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        config = BuildConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        origin = f"{file}: " if file else ""
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{origin}unknown key {where!r}; see `edgec build --print-config` for valid keys") from None
        raise ConfigError(f"{origin}{where}: {err['msg']} (got {err.get('input')!r})") from None
    unknown = [s for s in config.stages if s not in IMPLEMENTED and s not in PLANNED]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r} in stages: use {', '.join(DEFAULT_STAGES)}")
    return config
