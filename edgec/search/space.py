"""The ``[search]`` table of a search config: strategy, objectives, the space, and how points are drawn.

::

    [search]
    strategy = "grid"            # grid | random | tpe
    trials = 24                  # random / tpe
    objectives = ["accuracy", "transport_bytes", "p50_ms"]
    [search.space]
    "prune.sparsity" = [0.8, 0.9, 0.95]              # a list of values (any TOML value, tables too)
    "train.lr" = { low = 1e-4, high = 1e-2, log = true }   # a range: random / tpe only

Every key of the space is a config key as ``--set`` takes it (``prune.sparsity``, a stage id's
``prune-fine.sparsity``, ``model.args.widths``). Points are drawn deterministically: the grid in the
order the keys are written (the first key varies slowest), random and tpe from ``seed``.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from edgec.base.errors import ConfigError
from edgec.pipeline.stage import Strict

# objective -> "max" | "min". accuracy is the bundle's top-1 accuracy on the validation split,
# measured in its runtime: what selection uses. The test accuracy is reported, never selected on.
OBJECTIVES: dict[str, str] = {
    "accuracy": "max",
    "transport_bytes": "min",
    "model_bytes": "min",
    "p50_ms": "min",
    "p95_ms": "min",
}
LATENCY_OBJECTIVES = ("p50_ms", "p95_ms")


class Range(Strict):
    """A continuous (or, with two integer ends, integer) range: random and tpe draw from it."""

    low: float
    high: float
    log: bool = False
    integer: bool = Field(False, description="draw integers (default: true when low and high are both integers)")

    @model_validator(mode="before")
    @classmethod
    def _integer_default(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "integer" not in raw:
            lo, hi = raw.get("low"), raw.get("high")
            if isinstance(lo, int) and isinstance(hi, int) and not isinstance(lo, bool) and not isinstance(hi, bool):
                raw = {**raw, "integer": True}
        return raw

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log = true needs low > 0")
        return self

    def draw(self, rng: random.Random) -> int | float:
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        if self.integer:
            return int(min(max(round(value), math.ceil(self.low)), math.floor(self.high)))
        return float(value)


class LatencyConfig(Strict):
    """How each trial's bundle is timed (edgec's bench harness, batch 1, in its runtime here)."""

    runs: int = Field(200, ge=10, description="timed runs per measurement")
    min_seconds: float = Field(0.3, gt=0, description="keep timing at least this long per measurement")
    warmup: int = Field(10, ge=0)
    repeats: int = Field(3, ge=1, le=20, description="fresh-process measurements; the lowest p50 (and its p95) is kept")


class BestRule(Strict):
    """Which feasible trial ``best.toml`` holds, per target."""

    minimize: str | None = Field("transport_bytes", description="an objective to minimise")
    maximize: str | None = Field(None, description="an objective to maximise (instead of minimize)")
    max_accuracy_drop: float | None = Field(
        0.005, ge=0, le=1,
        description="validation accuracy at most this far below the best uncompressed model of the search "
                    "(the first stage's output): 0.005 is half a point")

    @model_validator(mode="after")
    def _one(self) -> "BestRule":
        if (self.minimize is None) == (self.maximize is None):
            raise ValueError("give exactly one of minimize or maximize")
        name = self.minimize or self.maximize
        if name not in OBJECTIVES and name not in ("test_accuracy", "ratio"):
            raise ValueError(f"unknown figure {name!r}: use one of {', '.join([*OBJECTIVES, 'ratio'])}")
        return self

    @property
    def figure(self) -> str:
        return self.minimize or self.maximize  # type: ignore[return-value]

    @property
    def direction(self) -> str:
        return "min" if self.minimize else "max"

    def describe(self) -> str:
        what = f"{'smallest' if self.minimize else 'largest'} {self.figure}"
        if self.max_accuracy_drop is not None:
            what += f" with validation accuracy drop <= {self.max_accuracy_drop * 100:g} pt"
        return what


class Constraints(Strict):
    """Extra limits on top of each target's budgets (a key given here replaces the target's)."""

    max_model_bytes: int | None = Field(None, gt=0)
    max_transport_bytes: int | None = Field(None, gt=0)
    max_p95_ms: float | None = Field(None, gt=0)
    max_p50_ms: float | None = Field(None, gt=0)
    min_accuracy: float | None = Field(None, ge=0, le=1, description="validation accuracy of the bundle")


class SearchConfig(Strict):
    strategy: Literal["grid", "random", "tpe"] = "grid"
    trials: int | None = Field(None, ge=1, le=100_000, description="random / tpe: how many trials (grid: every point)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the random and tpe samplers")
    objectives: list[str] = Field(default_factory=lambda: ["accuracy", "transport_bytes", "p50_ms"], min_length=1)
    space: dict[str, list[Any] | Range] = Field(min_length=1)
    cpus_per_trial: int = Field(1, ge=1, le=256, description="CPUs (and torch threads) of each trial, serial and on Ray")
    gpus_per_trial: float = Field(0, ge=0, le=64, description="GPUs Ray gives each trial (fractions share one)")
    max_concurrent: int | None = Field(None, ge=1, description="Ray: trials at once (default: as many as the CPUs allow)")
    latency_tolerance: float = Field(
        0.10, ge=0, le=10,
        description="latencies within this fraction of each other tie when comparing points (timing noise)")
    latency: LatencyConfig = LatencyConfig()
    best: BestRule = BestRule()
    constraints: Constraints = Constraints()

    @field_validator("objectives")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in OBJECTIVES:
                raise ValueError(f"unknown objective {name!r}: use {', '.join(OBJECTIVES)}")
        if len(set(v)) != len(v):
            raise ValueError("an objective is listed twice")
        return v

    @field_validator("space")
    @classmethod
    def _values(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, values in v.items():
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"space key {key!r} must be a dotted config key such as prune.sparsity")
            if isinstance(values, list) and not values:
                raise ValueError(f"space key {key!r}: the list of values is empty")
        return v

    @model_validator(mode="after")
    def _strategy(self) -> "SearchConfig":
        ranges = [k for k, v in self.space.items() if isinstance(v, Range)]
        if self.strategy == "grid" and ranges:
            raise ValueError(f"strategy = \"grid\" needs a list of values for every key; {ranges[0]!r} is a range "
                             "(use strategy = \"random\" or \"tpe\", or list its values)")
        if self.strategy != "grid" and self.trials is None:
            raise ValueError(f"strategy = \"{self.strategy}\" needs trials = N")
        return self

    @property
    def primary(self) -> list[tuple[str, str]]:
        return [(name, OBJECTIVES[name]) for name in self.objectives]

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.space.values() if isinstance(v, list))


def parse_search(raw: Any, overrides: dict[str, Any] | None = None) -> SearchConfig:
    """Validate the ``[search]`` table (with CLI overrides such as strategy / trials)."""
    if not isinstance(raw, dict):
        raise ConfigError("the search config needs a [search] table with a [search.space]")
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        return SearchConfig.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        # a space value given as a table failed as a range, not as a list: say why it is not a range
        err = next((x for x in errors if any("Range" in str(p) for p in x["loc"])), errors[0])
        if err["type"] in ("list_type", "model_type") and not isinstance(err.get("input"), (list, dict)):
            err = dict(err, msg="give a list of values, or a range {low, high[, log]} for random / tpe")
        dotted = ".".join(str(p) for p in err["loc"] if not str(p).startswith("list[") and "Range" not in str(p))
        where = f"search.{dotted}" if dotted else "search"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"[search]: unknown key {where!r}") from None
        raise ConfigError(f"[search]: {where}: {err['msg']} (got {err.get('input')!r})") from None


def grid_points(spec: SearchConfig) -> list[dict[str, Any]]:
    keys = list(spec.space)
    values = [spec.space[k] for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]  # type: ignore[arg-type]


def random_points(spec: SearchConfig) -> list[dict[str, Any]]:
    """``trials`` points drawn with ``seed``; an all-list space smaller than that is sampled without
    replacement first (no trial is spent twice on one point while others are left)."""
    rng = random.Random(spec.seed)
    n = spec.trials or 0
    if all(isinstance(v, list) for v in spec.space.values()):
        grid = grid_points(spec)
        order = list(range(len(grid)))
        rng.shuffle(order)
        picks = [order[i % len(order)] for i in range(n)]
        return [grid[i] for i in picks]
    points = []
    for _ in range(n):
        point = {}
        for key, values in spec.space.items():
            point[key] = values.draw(rng) if isinstance(values, Range) else values[rng.randrange(len(values))]
        points.append(point)
    return points


# -- Optuna (strategy = "tpe") ----------------------------------------------------------------------
# Parameters are named p0, p1, ... (a config key has dots; Tune flattens nested names on "/").
# A list is a categorical over its indices, so any TOML value (a table of per-layer sparsities) works.

def param_names(spec: SearchConfig) -> dict[str, str]:
    return {f"p{i}": key for i, key in enumerate(spec.space)}


def optuna_distributions(spec: SearchConfig) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name, key in param_names(spec).items():
        values = spec.space[key]
        if isinstance(values, Range):
            if values.integer:
                out[name] = IntDistribution(math.ceil(values.low), math.floor(values.high), log=values.log)
            else:
                out[name] = FloatDistribution(values.low, values.high, log=values.log)
        else:
            out[name] = CategoricalDistribution(list(range(len(values))))
    return out


def point_from_params(spec: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    point = {}
    for name, key in param_names(spec).items():
        values = spec.space[key]
        raw = params[name]
        if isinstance(values, Range):
            point[key] = int(raw) if values.integer else float(raw)
        else:
            point[key] = values[int(raw)]
    return point


def same_value(a: Any, b: Any) -> bool:
    """Equal as JSON, types included (1, 1.0 and true are three values; a point read from a file
    is the same point only when it is this one)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def params_from_point(spec: SearchConfig, point: dict[str, Any]) -> dict[str, Any] | None:
    """The Optuna parameters of a point; None unless the space draws exactly this point (a value
    not in the space any more, a key the space does not have)."""
    params = {}
    for name, key in param_names(spec).items():
        values = spec.space[key]
        if key not in point:
            return None
        if isinstance(values, Range):
            v = point[key]
            if not isinstance(v, (int, float)) or not values.low <= v <= values.high:
                return None
            params[name] = int(v) if values.integer else float(v)
        else:
            matches = [i for i, v in enumerate(values) if v == point[key] and type(v) is type(point[key])]
            if not matches:
                return None
            params[name] = matches[0]
    return params if same_value(point_from_params(spec, params), point) else None
