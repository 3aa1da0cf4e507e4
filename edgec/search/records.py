"""The trial store, ``OUT/trials/<id>.json`` (one record per finished trial), and the rule for reusing
a record.

A record is a file like any other: it may be edited, truncated, copied from another search or huge.
A restarted search reuses it only when it is the record this search would write for that point: a
regular file of bounded size, the schema's fields with their types, an id that is its file name and
the hash of its point under this search config, and the resolved config this search config gives
that point. Anything else is ignored, with one line saying why, and its trial runs again. The point
that is then built is always the job's own (drawn from the user's space), never the file's.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from edgec.base.errors import ConfigError

from . import space as sp
from .trial import RECORD_SCHEMA, SearchContext, TrialJob, portable_config, resolve

TRIALS_DIR = "trials"
FINISHED = ("ok", "rejected", "failed")  # "error" (a crash, a bug) is retried by a restarted search
MAX_RECORD_BYTES = 1 << 20  # a real record is a few KB; more is not a record
MAX_REPORTED = 5  # lines about ignored records; the rest are counted

Fraction = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Metrics(_Strict):
    accuracy: Fraction
    test_accuracy: Fraction
    reference_val_accuracy: Fraction | None
    reference_test_accuracy: Fraction | None
    trained_val_accuracy: Fraction | None
    top1_agreement: Fraction | None
    model_bytes: Count
    transport_bytes: Annotated[int, Field(ge=1)]
    fp32_bytes: Count
    ratio: Positive
    p50_ms: Positive
    p95_ms: Positive
    val_samples: Count
    test_samples: Count | None
    within_accuracy_budget: bool | None = None  # the build's accuracy_budget.met (None: not measured)


class Latency(_Strict):
    p50_ms: Positive
    p95_ms: Positive
    p50_ms_all: list[Positive]
    runtime: str
    settings: dict[str, str | int | float | bool | None]
    notes: list[str]


class StageRow(_Strict):
    id: str
    kind: str
    key: str
    cached: bool
    seconds: Positive


class Built(_Strict):
    status: Literal["ok"]
    feasible: Literal[True]
    reason: None
    metrics: Metrics
    latency: Latency
    precision: str
    stages: list[StageRow]
    bundle: str | None


class NotBuilt(_Strict):
    status: Literal["rejected", "failed"]
    feasible: Literal[False]
    reason: str
    metrics: dict[str, Positive | None]
    stages: list[StageRow]
    bundle: None


class Record(_Strict):
    schema_: Literal[RECORD_SCHEMA] = Field(alias="schema")  # type: ignore[valid-type]
    id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    number: Annotated[int, Field(ge=0, le=10**9)]
    point: dict[str, Any]  # compared with the job's point before any use
    status: Literal["ok", "rejected", "failed"]
    reason: str | None
    config: dict[str, Any] | None  # compared with this search's resolved config for the point
    threads: Annotated[int, Field(ge=1)]
    targets: dict[str, Annotated[Built | NotBuilt, Field(discriminator="status")]]
    stage_steps: Count
    stage_runs: Count
    seconds: Positive


class Ignored(ValueError):
    """Why a record in the store is not reused."""


class TrialStore:
    """``OUT/trials/<id>.json``, one per finished trial, written atomically."""

    def __init__(self, out: Path):
        self.dir = out / TRIALS_DIR

    def load(self, ctx: SearchContext, console: Console) -> dict[str, dict[str, Any]]:
        """The records this search may reuse, by id; one line for each file it ignores."""
        found: dict[str, dict[str, Any]] = {}
        ignored = []
        if self.dir.is_dir():
            for path in sorted(self.dir.glob("*.json")):
                try:
                    record = checked(read_record(path), path.stem, ctx)
                except Ignored as why:
                    ignored.append(f"{TRIALS_DIR}/{path.name}: {why}")
                    continue
                if record is not None:
                    found[record["id"]] = record
        for line in ignored[:MAX_REPORTED]:
            console.print(f"[yellow]ignored[/] {line} (not reused)")
        if len(ignored) > MAX_REPORTED:
            console.print(f"[yellow]ignored[/] {len(ignored) - MAX_REPORTED} more trial record(s) in {self.dir}")
        return found

    def write(self, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{record['id']}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.dir / f"{record['id']}.json")


def read_record(path: Path) -> Any:
    """The JSON of a record file: a regular file (not a link, FIFO or device) of bounded size."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            raise Ignored("not a regular file")
        if info.st_size > MAX_RECORD_BYTES:
            raise Ignored(f"{info.st_size:,} bytes, over the {MAX_RECORD_BYTES:,}-byte limit of a trial record")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except OSError as e:
        raise Ignored(f"cannot be read ({e.strerror})") from None
    if len(data) > MAX_RECORD_BYTES:
        raise Ignored(f"over the {MAX_RECORD_BYTES:,}-byte limit of a trial record")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # truncated, garbage, not UTF-8, nested too deep
        raise Ignored("not valid JSON (truncated or damaged)") from None


def checked(raw: Any, stem: str, ctx: SearchContext) -> dict[str, Any] | None:
    """``raw`` as a record this search may reuse; None for a crashed trial's record (it is retried);
    raises Ignored when it is not the record this search would have written for its point."""
    if isinstance(raw, dict) and raw.get("status") == "error":
        return None
    try:
        Record.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "the record"
        raise Ignored(f"{where}: {err['msg'].lower()}") from None
    if raw["id"] != stem:
        raise Ignored(f"its id {raw['id']} is not its file name")
    try:
        return _matching(raw, ctx)
    except RecursionError:  # a point or config nested too deep to hash
        raise Ignored("its point or config is nested too deep") from None


def _matching(raw: dict[str, Any], ctx: SearchContext) -> dict[str, Any]:
    if ctx.trial_id(raw["point"]) != raw["id"] or raw["threads"] != ctx.threads or set(raw["targets"]) != set(ctx.targets):
        raise Ignored("its point does not hash to its id under this search config: edited, or of another search")
    if not sp.same_value(raw["config"], expected_config(ctx, raw["point"])):
        raise Ignored("its config is not what this search config gives its point: edited, or of another search")
    return raw


def expected_config(ctx: SearchContext, point: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return portable_config(resolve(ctx.base, point, ctx.factories))
    except ConfigError:
        return None  # such a point is rejected before its config is recorded


def reuse(finished: dict[str, dict[str, Any]], job: TrialJob) -> dict[str, Any] | None:
    """The stored record of ``job`` when its point is exactly the job's (then built with the job's
    own point), else None: the trial runs."""
    record = finished.get(job.id)
    if record is None or not sp.same_value(record["point"], job.point):
        return None
    return {**record, "point": job.point, "number": job.number}
