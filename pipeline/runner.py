"""Validate a stage chain, print the plan, run each stage through the cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from rich.table import Table

from edgec.errors import ConfigError

from .artifact import Artifact
from .cache import StageCache, stable_hash
from .stage import Stage, StageContext


@dataclass
class StepResult:
    stage: str
    key: str
    cached: bool
    seconds: float
    artifact: Artifact


def validate_chain(stages: Sequence[Stage], source_kind: str) -> None:
    """Each stage must consume what the previous one produces; checked before any work."""
    kind = source_kind
    for stage in stages:
        if stage.consumes != kind:
            raise ConfigError(
                f"stage {stage.name!r} consumes a {stage.consumes} but the stage before it produces a {kind}; "
                "reorder `stages`"
            )
        kind = stage.produces


def cache_key(stage: Stage, ctx: StageContext, input_digest: str) -> str:
    return stable_hash({**stage.key_material(ctx), "input": input_digest})


def run_chain(
    stages: Sequence[Stage],
    source: Artifact,
    ctx: StageContext,
    cache: StageCache,
    force_from: int | None = None,
) -> list[StepResult]:
    """Run ``stages`` in order; ``force_from`` reruns that index and everything after it."""
    validate_chain(stages, source.kind)
    _print_plan(stages, source, ctx, cache, force_from)
    results: list[StepResult] = []
    current = source
    for i, stage in enumerate(stages):
        key = cache_key(stage, ctx, current.digest)
        forced = force_from is not None and i >= force_from
        start = time.perf_counter()
        hit = None if forced else cache.get(stage.name, key)
        if hit is not None:
            ctx.console.print(f"[green]cached[/] {stage.name}  [dim]{key[:12]}[/]")
            current = hit
        else:
            ctx.console.print(f"[bold cyan]run[/]    {stage.name}  [dim]{key[:12]}[/]")
            current = cache.put(stage.name, key, stage.produces, lambda out: stage.run(current, ctx, out))
        results.append(StepResult(stage.name, key, hit is not None, time.perf_counter() - start, current))
    return results


def _print_plan(stages, source, ctx, cache, force_from) -> None:
    """Walk the chain as far as input digests are known; after the first stage that must run,
    later ones are 'to run' (their input is not known until it has run)."""
    table = Table(title="plan", show_edge=False)
    table.add_column("#")
    table.add_column("stage")
    table.add_column("status")
    digest: str | None = source.digest
    for i, stage in enumerate(stages):
        status = "to run"
        if digest is not None and not (force_from is not None and i >= force_from):
            hit = cache.get(stage.name, cache_key(stage, ctx, digest))
            if hit is not None:
                status, digest = "[green]cached[/]", hit.digest
            else:
                digest = None
        elif force_from is not None and i >= force_from:
            status, digest = "forced", None
        table.add_row(str(i + 1), stage.name, status)
    ctx.console.print(table)
