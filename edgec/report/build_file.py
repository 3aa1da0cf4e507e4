"""Reading ``build.json`` for the report: every field the report uses is type- and range-checked
first, so an edited or damaged file is refused in one line naming the first bad field instead of
failing somewhere in the middle of a plot.

Fields the report does not use are left alone (a newer edgec may add some); the checked ones are
strict: a string is never taken for a number. A stage's ``kind`` and ``key`` name a folder of the
stage cache, so they must look like an id and a sha256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from edgec.build_layout import BUILD_FILE
from edgec.base.errors import InputError

MAX_BUILD_FILE_BYTES = 64 << 20

Count = Optional[Annotated[StrictInt, Field(ge=0)]]
Amount = Optional[Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]]
Fraction = Optional[Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)]]


class _Checked(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Total(_Checked):
    params: Count = None
    nonzero: Count = None
    sparsity: Fraction = None


class _Layer(_Total):
    layer: StrictStr


class _Sparsity(_Checked):
    layers: list[_Layer] = []
    total: _Total = _Total()


Points = Annotated[StrictFloat, Field(ge=-1e6, le=1e6, allow_inf_nan=False)]  # a metric or its drop, in points
Figure = Annotated[StrictFloat, Field(ge=-1e9, le=1e9, allow_inf_nan=False)]  # a metric value (R^2 may be << 0)
Name = Annotated[StrictStr, Field(max_length=256)]
MAX_LAYERS, MAX_POINTS = 4096, 64  # bounds on what the report draws (a real model has far fewer)


class _CurvePoint(_Checked):
    sparsity: Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)]
    drop_pt: Points


class _Trial(_Checked):
    level: Annotated[StrictInt, Field(ge=0, le=MAX_POINTS)]
    drop_pt: Points
    accepted: StrictBool


class _Level(_Checked):
    tolerance_pt: Points
    sparsity: Annotated[dict[Name, Fraction], Field(max_length=MAX_LAYERS)]


class _Sensitivity(_Checked):
    """The budgeted prune's record (pipeline/stages/prune.py)."""
    share_pt: Optional[Points] = None
    curves: Annotated[dict[Name, Annotated[list[_CurvePoint], Field(max_length=MAX_POINTS)]],
                      Field(max_length=MAX_LAYERS)] = {}
    chosen: Annotated[dict[Name, Fraction], Field(max_length=MAX_LAYERS)] = {}
    levels: Annotated[list[_Level], Field(max_length=MAX_POINTS)] = []
    trials: Annotated[list[_Trial], Field(max_length=MAX_POINTS)] = []


class _BudgetStage(_Checked):
    stage: Name
    val: Figure
    drop_pt: Points


class _AccuracyBudget(_Checked):
    """build.json's ``accuracy_budget`` (pipeline/accuracy_budget.py)."""
    metric: Name
    reference: Figure
    bundle_val: Figure
    drop_pt: Points
    budget_pt: Annotated[StrictFloat, Field(ge=0, le=1e6, allow_inf_nan=False)]
    met: StrictBool
    stages: Annotated[list[_BudgetStage], Field(max_length=MAX_LAYERS)] = []


class _Info(_Checked):
    accuracy: Fraction = None
    reference_accuracy: Fraction = None
    top1_agreement: Fraction = None
    params: Count = None
    nonzero_params: Count = None
    fp32_bytes: Count = None
    deep_compression_bytes: Count = None
    model_bytes: Count = None
    transport_bytes: Count = None
    precision: Optional[StrictStr] = None
    sparsity: Optional[_Sparsity] = None
    distinct_values: dict[str, Count] = {}
    task_accuracy: dict[str, Fraction] = {}
    tasks: list[StrictStr] | dict[StrictStr, Any] = []  # learn: the order; a multi-task export: per task
    task: Optional[StrictStr] = None
    method: Optional[StrictStr] = None
    sensitivity: Optional[_Sensitivity] = None


class _Stage(_Checked):
    stage: StrictStr
    id: Optional[StrictStr] = None
    kind: Optional[Annotated[StrictStr, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]] = None
    key: Optional[Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]] = None
    cached: StrictBool = False
    seconds: Amount = None
    info: _Info = _Info()


class _ModelConfig(_Checked):
    name: Optional[StrictStr] = None
    weights: Optional[StrictStr] = None


class _Config(_Checked):
    cache_dir: Optional[StrictStr] = None
    model: _ModelConfig = _ModelConfig()


class BuildFile(_Checked):
    target: StrictStr = "-"
    data: StrictStr = "-"
    seed: Optional[StrictInt] = None
    source: _Info = _Info()
    config: _Config = _Config()
    stages: list[_Stage]
    accuracy_budget: Optional[_AccuracyBudget] = None


def read_build(build_dir: Path) -> dict[str, Any]:
    """build.json of ``build_dir`` as plain data, checked against :class:`BuildFile`; InputError
    naming the first bad field otherwise."""
    path = build_dir / BUILD_FILE
    if not path.is_file():
        raise InputError(f"{build_dir} is not an edgec build directory (no {BUILD_FILE}); "
                         "pass <out>/<target>/ written by `edgec build`")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BUILD_FILE_BYTES + 1)
        if len(raw) > MAX_BUILD_FILE_BYTES:
            raise ValueError(f"bigger than {MAX_BUILD_FILE_BYTES >> 20} MiB")
        summary = json.loads(raw)
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not a readable JSON file ({e}); rebuild with `edgec build`") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("stages"), list):
        raise InputError(f"{path} has no stage list; rebuild with `edgec build`")
    try:
        BuildFile.model_validate(summary)
    except ValidationError as e:
        err = e.errors()[0]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        got = repr(err.get("input"))[:60]
        raise InputError(f"{path}: {field}: {err['msg']} (got {got}); the file was altered or damaged, "
                         "rebuild with `edgec build`") from None
    return summary
