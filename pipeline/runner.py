"""Check a stage chain as a whole, print the plan, run each stage through the cache."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from rich.table import Table

from edgec.base.checkpoint import load_checkpoint
from edgec.base.data import Dataset
from edgec.base.errors import ConfigError, EdgecError, InputError, RunError

from .accuracy_budget import reference_index
from .artifact import CHECKPOINT_FILE, MODEL, Artifact
from .cache import StageCache, stable_hash
from .extensions import PINS_WEIGHTS
from .stage import Probe, Stage, StageContext


@dataclass
class StepResult:
    id: str
    kind: str
    key: str
    cached: bool
    seconds: float
    artifact: Artifact


def context_for(stage: Stage, ctx: StageContext, datasets: Mapping[str, Dataset]) -> StageContext:
    """The stage's own context: its named dataset when it reads one, else the main data."""
    name = getattr(stage.config, "data", None)
    return ctx if name is None else dataclasses.replace(ctx, data=datasets[name])


def _reference_at(stages: Sequence[Stage], i: int, source: Artifact, ref_artifact: Artifact | None) -> Artifact | None:
    """The trained reference stage ``i`` sees: the source when the chain has no train stage, else
    ``ref_artifact`` (the first train stage's output) for the stages after that one."""
    ref = reference_index([s.kind for s in stages])
    if ref is None:
        return source
    return ref_artifact if i > ref else None


def check_chain(
    stages: Sequence[Stage], source: Artifact, ctx: StageContext, datasets: Mapping[str, Dataset] | None = None
) -> None:
    """Every stage's ``check`` in order, on the real model, before any stage runs: a config error in
    the last stage costs seconds, not a training run. Errors name the stage id."""
    datasets = datasets or {}
    ckpt = source.checkpoint()
    bad = ckpt.first_nonfinite()
    if bad is not None:
        raise InputError(f"the initial weights hold NaN or infinite values in {bad}; start from weights that are finite")
    probe = Probe(kind=source.kind, model=ckpt.build(ctx.trust), arch=ckpt.arch, data=ctx.data, target=ctx.target,
                  trust=ctx.trust, datasets=ctx.datasets, tasks=ctx.tasks, extensions=ckpt.extensions)
    pinned_by: dict[str, str] = {}  # weight-pinning extension -> the id of the stage of this chain that wrote it
    for stage in stages:
        if stage.consumes != probe.kind:
            raise ConfigError(
                f"stage {stage.id!r} ({stage.kind}) consumes a {stage.consumes} but the stage before it produces a "
                f"{probe.kind}; reorder the stages"
            )
        _refuse_after_pinned(stage, probe, pinned_by)
        stage_ctx = context_for(stage, ctx, datasets)
        try:
            probe = stage.check(probe.evolve(data=stage_ctx.data)).evolve(kind=stage.produces)
        except EdgecError as e:
            e.args = (f"stage {stage.id!r}: {e}",)
            raise
        pinned_by.update({ns: stage.id for ns in stage.writes_extensions if ns in PINS_WEIGHTS and ns in probe.extensions})


def _refuse_after_pinned(stage: Stage, probe: Probe, pinned_by: dict[str, str]) -> None:
    """A stage may not follow state fitted to the exact weights (qat's int8 ranges) unless it accepts it."""
    for ns, why in PINS_WEIGHTS.items():
        if ns not in probe.extensions or ns in stage.accepts_extensions:
            continue
        writer = pinned_by.get(ns)
        takers = " or ".join(kind for kind, cls in Stage.registry.items() if ns in cls.accepts_extensions) or "none"
        raise ConfigError(
            f"stage {stage.id!r} ({stage.kind}) comes after {ns} stage {writer!r}; {ns} must be the last stage before "
            f"{takers} ({why}): move {stage.id!r} before {writer!r}"
            if writer else
            f"stage {stage.id!r} ({stage.kind}) would change a model whose {ns} state pins its weights ({why}; only "
            f"{takers} may follow {ns}): start from the checkpoint before {ns}"
        )


def cache_key(stage: Stage, ctx: StageContext, input_digest: str) -> str:
    # Training results differ with the thread count (reductions are split differently), so it is
    # part of every key: a cached result is only served to a build that would reproduce it.
    return stable_hash({**stage.key_material(ctx), "input": input_digest, "threads": torch.get_num_threads()})


def run_chain(
    stages: Sequence[Stage],
    source: Artifact,
    ctx: StageContext,
    cache: StageCache,
    force_from: int | None = None,
    datasets: Mapping[str, Dataset] | None = None,
) -> list[StepResult]:
    """Run ``stages`` in order; ``force_from`` reruns that index and everything after it."""
    datasets = datasets or {}
    contexts = [dataclasses.replace(context_for(stage, ctx, datasets), cache=cache) for stage in stages]
    _print_plan(stages, source, ctx, cache, datasets, force_from)
    results: list[StepResult] = []
    current = source
    reference = None
    for i, (stage, stage_ctx) in enumerate(zip(stages, contexts)):
        stage_ctx = dataclasses.replace(stage_ctx, reference=_reference_at(stages, i, source, reference))
        key = cache_key(stage, stage_ctx, current.digest)
        forced = force_from is not None and i >= force_from
        start = time.perf_counter()
        hit = None if forced else cache.get(stage.kind, key)
        if hit is not None:
            ctx.console.print(f"[green]cached[/] {stage.id}  [dim]{key[:12]}[/]")
            current = hit
        else:
            ctx.console.print(f"[bold cyan]run[/]    {stage.id}  [dim]{key[:12]}[/]")
            source_artifact = current
            current = cache.put(stage.kind, key, stage.produces,
                                lambda out: _run_checked(stage, source_artifact, stage_ctx, out), force=forced)
        results.append(StepResult(stage.id, stage.kind, key, hit is not None, time.perf_counter() - start, current))
        if i == reference_index([s.kind for s in stages]):
            reference = current
    return results


def _run_checked(stage: Stage, source: Artifact, ctx: StageContext, out) -> dict:
    """``stage.run``, then its model refused (before the cache keeps it) when a weight or buffer is
    not finite: a diverged run must not be exported and published as if it had worked."""
    info = stage.run(source, ctx, out)
    if stage.produces == MODEL:
        bad = load_checkpoint(out / CHECKPOINT_FILE).first_nonfinite()
        if bad is not None:
            raise RunError(f"stage {stage.id!r} produced NaN or infinite values in {bad}: training diverged; scale the "
                           "inputs to values of order 1 (e.g. standardise them) or lower the learning rate")
    return info


def plan_status(stages, source, ctx, cache, datasets=None, force_from=None) -> list[dict]:
    """Walk the chain as far as input digests are known; after the first stage that must run,
    later ones are 'to run' (their input is not known until it has run)."""
    contexts = [context_for(stage, ctx, datasets or {}) for stage in stages]
    rows = []
    digest: str | None = source.digest
    reference = None
    for i, (stage, stage_ctx) in enumerate(zip(stages, contexts)):
        status = "to run"
        stage_ctx = dataclasses.replace(stage_ctx, reference=_reference_at(stages, i, source, reference))
        if force_from is not None and i >= force_from:
            status, digest = "forced", None
        elif digest is not None:
            hit = cache.get(stage.kind, cache_key(stage, stage_ctx, digest))
            if hit is not None:
                status, digest = "cached", hit.digest
                if i == reference_index([s.kind for s in stages]):
                    reference = hit
            else:
                digest = None
        rows.append({"id": stage.id, "kind": stage.kind, "data": stage.config.data or "main", "status": status,
                     "cached": status == "cached"})
    return rows


def _print_plan(stages, source, ctx, cache, datasets, force_from) -> None:
    table = Table(title="plan", show_edge=False)
    for col in ("#", "stage", "kind", "data", "status"):
        table.add_column(col)
    for i, row in enumerate(plan_status(stages, source, ctx, cache, datasets, force_from)):
        status = "[green]cached[/]" if row["cached"] else row["status"]
        table.add_row(str(i + 1), row["id"], row["kind"], row["data"], status)
    ctx.console.print(table)
