"""Target profiles: data files (``targets/profiles/*.toml`` or a user's ``board.toml``).

Field reference (also in the README):
  name, description       shown by ``edgec targets``
  format                  tflite | onnx
  precision               default precision of the shipped model (int8 | fp16 | fp32)
  precisions              precisions this target accepts for ``--precision``
  arch                    CPU architecture of the device (documentation; arm64 triggers the emulated check)
  threads                 runtime threads the bundle recommends until ``edgec bench`` measures better
  providers               onnxruntime execution providers in order of preference (onnx only)
  fp32_fallback           also ship an fp32 model file beside a reduced-precision one (onnx only)
  requirements            pip requirement lines for the device (written to the bundle's requirements.txt)
  requirements_file       or: a requirements file beside the built-in profiles (rpi: the same file the
                          arm64 emulation and Dockerfile.arm64 install, so there is one install list)
  budgets                 limits enforced by ``edgec check``; a missing limit is not checked
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgec.errors import ConfigError

PROFILES_DIR = Path(__file__).parent / "profiles"

Precision = Literal["int8", "fp16", "fp32"]


class Budgets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_model_bytes: int | None = Field(None, gt=0)
    max_transport_bytes: int | None = Field(None, gt=0)
    max_p95_ms: float | None = Field(None, gt=0)
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="reference accuracy minus bundle accuracy")
    min_agreement: float = Field(0.99, ge=0, le=1, description="top-1 agreement with the reference model")


class TargetProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    format: Literal["tflite", "onnx"]
    precision: Precision
    precisions: list[Precision]
    arch: str = "any"
    threads: int = Field(1, ge=1)
    providers: list[str] = ["CPUExecutionProvider"]
    fp32_fallback: bool = False
    requirements: list[str] = []
    requirements_file: str | None = None
    budgets: Budgets = Budgets()

    @model_validator(mode="after")
    def _read_requirements_file(self):
        if self.requirements_file:
            path = Path(__file__).parent / self.requirements_file
            if not path.is_file():
                raise ValueError(f"requirements_file {self.requirements_file!r} not found beside the built-in profiles")
            self.requirements = [
                line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
            ]
        if not self.requirements:
            raise ValueError("a target needs requirements (or requirements_file): the packages its device installs")
        return self


def builtin_targets() -> dict[str, TargetProfile]:
    return {p.stem: _read(p) for p in sorted(PROFILES_DIR.glob("*.toml"))}


def load_target(spec: str) -> TargetProfile:
    """A built-in target name, or the path of a user's profile file."""
    if spec.endswith(".toml") or "/" in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"target file {path} does not exist")
        return _read(path)
    builtins = builtin_targets()
    if spec not in builtins:
        raise ConfigError(f"unknown target {spec!r}: use one of {', '.join(builtins)} or a path to a board.toml")
    return builtins[spec]


def _read(path: Path) -> TargetProfile:
    try:
        return TargetProfile.model_validate(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: {where}: {err['msg']}") from None
