"""Target profiles: data files (``targets/profiles/*.toml`` or a user's ``board.toml``).

Field reference (also in the README):
  name, description       shown by ``edgec targets``
  format                  tflite | onnx (the formats of the converter registry, ``converters.py``)
  precision               default precision of the shipped model (int8 | fp16 | fp32)
  precisions              precisions this target accepts for ``--precision``
  arch                    CPU architecture of the device (documentation; arm64 triggers the emulated check)
  threads                 runtime threads the bundle recommends until ``edgec bench`` measures better
  providers               onnxruntime execution providers in order of preference (onnx only)
  fp32_fallback           also ship an fp32 model file beside a reduced-precision one (onnx only)
  allow_mixed_precision   int8 that misses the export parity gate may keep its worst layers in float
                          (selective mixed precision) before the build refuses; false: pure int8 or refuse
  requirements            pip requirement lines for the device (written to the bundle's requirements.txt)
  requirements_file       or: a requirements file, a relative path resolved inside the folder of the
                          profile: for the built-in profiles the ``targets/`` data folder (rpi: the same
                          file the arm64 emulation and Dockerfile.arm64 install, so there is one install
                          list), for a user's board.toml the folder of that file. No absolute path, no
                          '..', no symlink.
  budgets                 limits enforced by ``edgec check``; a missing limit is not checked
                          (min_speedup: bundle p50 vs the uncompressed model's, from ``edgec bench --baseline``;
                          max_export_drop, min_agreement, min_logit_snr_db: the export stage's parity with the
                          model that entered it; the old key max_accuracy_drop is read as max_export_drop)
  budget                  max_accuracy_drop: the accuracy budget in points against the trained model
                          (default 1.0; a build's [budget] / --max-drop overrides it)

``name`` becomes the build's output folder ``<out>/<name>/``, so it is a safe identifier
(``NAME_PATTERN``). Every error is a one-line ConfigError naming the file and the key.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from edgec.base.errors import ConfigError
from edgec.base.suggest import did_you_mean
from edgec.base.tomlfile import read_toml

from .converters import FORMATS

PROFILES_DIR = Path(__file__).parent / "profiles"
# Where a built-in profile's requirements_file may live: the targets/ data folder (profiles/ and the
# device requirement lists beside it, all shipped as package data of edgec.targets).
BUILTIN_DATA_DIR = Path(__file__).parent
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
MAX_THREADS = 256
MAX_REQUIREMENTS_BYTES = 1 << 20

Precision = Literal["int8", "fp16", "fp32"]


class Budgets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_model_bytes: int | None = Field(None, gt=0)
    max_transport_bytes: int | None = Field(None, gt=0)
    max_p95_ms: float | None = Field(None, gt=0)
    max_export_drop: float = Field(0.01, ge=0, le=1, description="accuracy of the model that entered export minus "
                                   "the bundle's, on the test split (a fraction; formerly max_accuracy_drop)")
    min_agreement: float = Field(0.99, ge=0, le=1, description="top-1 agreement with the reference model on the "
                                 "samples whose top-1 margin exceeds the int8 error bound (near-ties excluded)")
    min_logit_snr_db: float = Field(15.0, ge=0, le=200, description="signal-to-noise ratio of the exported model's "
                                    "outputs against the reference's, in dB")
    min_speedup: float | None = Field(
        None, gt=0, description="the bundle's p50 latency must be this many times lower than the uncompressed model's, "
        "exported for the same target and timed in the same run (edgec bench --baseline)")

    @model_validator(mode="before")
    @classmethod
    def _old_key(cls, raw):
        """Profiles written before the accuracy budget: their [budgets] max_accuracy_drop is max_export_drop."""
        if isinstance(raw, dict) and "max_accuracy_drop" in raw:
            if "max_export_drop" in raw:
                raise ValueError("max_accuracy_drop is the old name of max_export_drop: keep only max_export_drop")
            raw = {("max_export_drop" if k == "max_accuracy_drop" else k): v for k, v in raw.items()}
        return raw


class AccuracyBudget(BaseModel):
    """[budget]: the target's default accuracy budget (a build's [budget] / --max-drop overrides it)."""

    model_config = ConfigDict(extra="forbid")

    max_accuracy_drop: float | None = Field(None, ge=0, le=100, description="points of the trained model's "
                                            "validation metric the bundle may lose")


class TargetProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    format: str
    precision: Precision
    precisions: list[Precision]
    arch: str = "any"
    threads: int = Field(1, ge=1, le=MAX_THREADS)
    providers: list[str] = Field(["CPUExecutionProvider"], min_length=1)
    fp32_fallback: bool = False
    allow_mixed_precision: bool = False
    requirements: list[str] = []
    requirements_file: str | None = None
    budgets: Budgets = Budgets()
    budget: AccuracyBudget = AccuracyBudget()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(NAME_PATTERN, v) or ".." in v:
            raise ValueError(
                f"{v!r} is not a safe target name (it becomes the output folder <out>/<name>/): use 1 to 64 "
                "lower-case letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"
            )
        return v

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"{v!r} is not a model format edgec converts to: use one of {', '.join(FORMATS)}")
        return v

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(r"[A-Za-z0-9_]{1,100}", p):
                raise ValueError(f"{p!r} is not an onnxruntime execution provider name (e.g. CPUExecutionProvider)")
        return v

    @field_validator("requirements_file")
    @classmethod
    def _relative_requirements_file(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = v.replace("\\", "/").split("/")
        if not v or v.startswith(("/", "~")) or "\\" in v or ":" in v or any(p in ("", ".", "..") for p in parts):
            raise ValueError(
                f"{v!r} must be a relative path inside the profile's folder (no absolute path, no '..')"
            )
        return v

    @model_validator(mode="after")
    def _read_requirements_file(self, info: ValidationInfo):
        if self.requirements_file:
            base = (info.context or {}).get("base_dir") or BUILTIN_DATA_DIR
            self.requirements = _read_requirements(Path(base), self.requirements_file)
        if not self.requirements:
            raise ValueError("a target needs requirements (or requirements_file): the packages its device installs")
        return self


def _read_requirements(base: Path, rel: str) -> list[str]:
    """The requirement lines of ``base/rel``: a regular file inside ``base`` reached without a symlink."""
    where = "the built-in profiles' folder" if base == BUILTIN_DATA_DIR else f"{base}"
    path = base
    for part in rel.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ValueError(f"requirements_file {rel!r} not found in {where}") from None
        except OSError as e:
            raise ValueError(f"requirements_file {rel!r} cannot be read ({e.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            raise ValueError(f"requirements_file {rel!r} goes through a symlink ({path.name}); use a regular file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"requirements_file {rel!r} is not a regular file")
    real_base, real = os.path.realpath(base), os.path.realpath(path)
    if os.path.commonpath([real_base, real]) != real_base:
        raise ValueError(f"requirements_file {rel!r} resolves outside {where}")
    if st.st_size > MAX_REQUIREMENTS_BYTES:
        raise ValueError(f"requirements_file {rel!r} is bigger than {MAX_REQUIREMENTS_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"requirements_file {rel!r} cannot be read ({e})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def builtin_targets() -> dict[str, TargetProfile]:
    return {p.stem: _read(p, builtin=True) for p in sorted(PROFILES_DIR.glob("*.toml"))}


def load_target(spec: str) -> TargetProfile:
    """A built-in target name, or the path of a user's profile file."""
    if spec.endswith(".toml") or "/" in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"target file {path} does not exist")
        return _read(path, builtin=False)
    builtins = builtin_targets()
    if spec not in builtins:
        raise ConfigError(f"unknown target {spec!r}{did_you_mean(spec, builtins)}: use one of {', '.join(builtins)} "
                          "or a path to a board.toml")
    return builtins[spec]


def _read(path: Path, builtin: bool) -> TargetProfile:
    """Validate a profile file: a built-in one's requirements_file resolves in the built-in data
    folder, a user's in the folder of its board.toml."""
    base = BUILTIN_DATA_DIR if builtin else path.resolve().parent
    data = read_toml(path)
    try:
        return TargetProfile.model_validate(data, context={"base_dir": base})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = " ".join(str(err["msg"]).removeprefix("Value error, ").split())
        if not where:  # a check across fields: name the key it is about
            where = "requirements_file" if "requirements_file" in msg else "requirements"
        raise ConfigError(f"{path}: {where}: {msg}") from None
