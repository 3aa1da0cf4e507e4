"""Run a search: draw the points, run the trials embedded (in this process, one after another) or on
Ray Tune, keep every finished trial in ``OUT/trials/<id>.json`` (a restarted search reuses them),
then rank per target.

Embedded and Ray run the same function per trial (:func:`edgec.search.trial.run_trial`) with the same
torch thread count (``cpus_per_trial``), so the same points give the same models, bytes and
accuracies; grid and random points are drawn before any trial runs, so both backends run the same
trials. ``tpe`` asks Optuna for points: embedded through Optuna's ask/tell, on Ray through Tune's
``OptunaSearch`` (same sampler and seed); with several trials at once on Ray it suggests from fewer
finished trials than the serial run does, so its path may differ.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from edgec.base.errors import ConfigError, InputError
from edgec.base.tomlfile import read_toml

from . import space as sp
from .progress import Progress, objective_values
from .records import TrialStore, reuse
from .trial import (SearchContext, TrialJob, named_factories, prefix_lock_name, require_classification, resolve,
                    run_trial)

@dataclass
class SearchSetup:
    search: sp.SearchConfig
    base: dict[str, Any]  # the build config without [search]
    targets: list[str]
    out: Path
    cache_dir: Path
    config_file: Path | None = None

    @property
    def factories(self) -> frozenset[str]:
        return named_factories(self.base, self.search.space)


@dataclass
class SearchOutcome:
    setup: SearchSetup
    records: list[dict[str, Any]]  # one per trial of this search, by number
    backend: str
    seconds: float
    ran: list[str] = field(default_factory=list)  # ids of the trials run now (the others were reused)
    ray: dict[str, Any] | None = None

    @property
    def stage_steps(self) -> int:
        return sum(r["stage_steps"] for r in self.records if r["id"] in self.ran)

    @property
    def stage_runs(self) -> int:
        return sum(r["stage_runs"] for r in self.records if r["id"] in self.ran)


def load_setup(path: Path, *, targets: list[str] | None = None, data: str | None = None, out: Path | None = None,
               cache_dir: Path | None = None, strategy: str | None = None, trials: int | None = None,
               cpus_per_trial: int | None = None) -> SearchSetup:
    """Read a search config: the build config (edgec.toml keys) plus a ``[search]`` table."""
    if not path.is_file():
        raise ConfigError(f"search config {path} does not exist")
    raw = read_toml(path)
    return make_setup(raw, targets=targets, data=data, out=out, cache_dir=cache_dir, strategy=strategy, trials=trials,
                      cpus_per_trial=cpus_per_trial, config_file=path)


def make_setup(raw: dict[str, Any], *, targets: list[str] | None = None, data: str | None = None,
               out: Path | None = None, cache_dir: Path | None = None, strategy: str | None = None,
               trials: int | None = None, cpus_per_trial: int | None = None,
               config_file: Path | None = None) -> SearchSetup:
    from edgec.base.locations import default_cache_dir
    from edgec.targets.profile import load_target

    raw = dict(raw)
    search = sp.parse_search(raw.pop("search", None),
                             {"strategy": strategy, "trials": trials, "cpus_per_trial": cpus_per_trial})
    for key in ("out", "cache_dir"):
        raw.pop(key, None)  # the search's own folders are given to it, never to each trial
    if data is not None:
        raw["data"] = {**(raw.get("data") or {}), "source": data}
    targets = list(dict.fromkeys(targets or [raw.get("target", "rpi")]))
    raw.pop("target", None)
    for t in targets:
        load_target(t)  # an unknown target is an error now, not in every trial
    return SearchSetup(search=search, base=raw, targets=targets, out=(out or Path("edgec-search")).resolve(),
                       cache_dir=(cache_dir or default_cache_dir()).resolve(), config_file=config_file)


# -- the search -----------------------------------------------------------------------------------

def run_search(setup: SearchSetup, *, use_ray: bool = False, ray_address: str | None = None,
               ray_cpus: int | None = None, console: Console | None = None) -> SearchOutcome:
    """Run every trial not already finished in ``setup.out``; returns all of them (reused too)."""
    console = console or Console(quiet=True)
    start = time.perf_counter()
    spec = setup.search
    _preflight(setup)
    setup.out.mkdir(parents=True, exist_ok=True)
    ctx = SearchContext(base=setup.base, targets=tuple(setup.targets), out=setup.out, cache_dir=setup.cache_dir,
                        threads=spec.cpus_per_trial, latency=spec.latency.model_dump(), coordinate=use_ray,
                        factories=setup.factories)
    store = TrialStore(setup.out)
    finished = store.load(ctx, console)
    backend = "ray" if use_ray else "embedded"
    console.print(f"search  {spec.strategy}, objectives {', '.join(spec.objectives)}, targets {', '.join(setup.targets)}, "
                  f"{backend}, {spec.cpus_per_trial} CPU(s) per trial")
    report = Progress(console, store)
    ray_info = None
    if spec.strategy in ("grid", "random"):
        points = sp.grid_points(spec) if spec.strategy == "grid" else sp.random_points(spec)
        jobs = _jobs(ctx, points)
        reused = {j.id: record for j in jobs if (record := reuse(finished, j)) is not None}
        pending = [j for j in jobs if j.id not in reused]
        console.print(f"trials  {len(jobs)} ({len(jobs) - len(pending)} finished before, reused; {len(pending)} to run)")
        report.total = len(pending)
        if pending:
            if use_ray:
                backend_ = _ray_backend()
                with backend_.ray_session(ray_address, ray_cpus, console) as ray_info:
                    backend_.run_grid(ctx, spec, _with_shared_prefixes(ctx, pending), report)
            else:
                for job in pending:
                    report(run_trial(ctx, job))
        records_by_id = {**reused, **report.records}
        records = [{**records_by_id[j.id], "number": j.number} for j in jobs if j.id in records_by_id]
    else:
        records = _tpe(ctx, spec, finished, report, use_ray, ray_address, ray_cpus, console)
        ray_info = report.ray_info
    missing = report.errors
    if missing:
        console.print(f"[yellow]{len(missing)} trial(s) crashed[/] (rerun the search to retry them): "
                      + "; ".join(f"{r['id']}: {r['reason']}" for r in missing[:3]))
    return SearchOutcome(setup, records, backend, time.perf_counter() - start, ran=list(report.records),
                         ray=ray_info)


def check_points(setup: SearchSetup, console: Console | None = None) -> list[dict[str, Any]]:
    """A dry run: every grid / random point (tpe: random draws from its space) through the plan-time
    check for every target, with no training. One row per point: its status per target ("ok" with
    how many stages are cached, or "rejected" and why)."""
    import torch

    from edgec import api

    spec = setup.search
    _preflight(setup)
    points = sp.grid_points(spec) if spec.strategy == "grid" else sp.random_points(spec)
    previous = torch.get_num_threads()
    torch.set_num_threads(spec.cpus_per_trial)  # cached or not is a question about these cache keys
    rows = []
    try:
        for number, point in enumerate(points):
            row: dict[str, Any] = {"number": number, "point": point, "targets": {}}
            try:
                config = resolve(setup.base, point, setup.factories)
            except ConfigError as e:
                row["targets"] = {t: {"status": "rejected", "reason": str(e)} for t in setup.targets}
                rows.append(row)
                continue
            for target in setup.targets:
                try:
                    plan = api.check(config, target=target, cache_dir=setup.cache_dir, console=console)
                except (ConfigError, InputError) as e:
                    row["targets"][target] = {"status": "rejected", "reason": str(e)}
                    continue
                row["targets"][target] = {"status": "ok", "stages": len(plan),
                                          "cached": sum(r["cached"] for r in plan)}
            rows.append(row)
    finally:
        torch.set_num_threads(previous)
    return rows


def _ray_backend():
    try:
        from . import ray_backend
    except ImportError as e:
        raise InputError(f"--ray needs Ray Tune ({e}): pip install 'ray[tune]'") from None
    return ray_backend


def _preflight(setup: SearchSetup) -> None:
    """What would fail every trial the same way fails the search now: a task it cannot rank, data
    that is not there, a chain that does not end with export."""
    from edgec import api
    from edgec.config import parse_config

    try:
        task = parse_config(copy.deepcopy(setup.base)).task
    except ConfigError:
        task = "classification"  # the base alone may be incomplete: each point is checked with its own keys
    require_classification(task)
    spec = setup.search
    first = sp.grid_points(spec)[0] if spec.strategy == "grid" else sp.random_points(spec)[0]
    try:
        config = resolve(setup.base, first, setup.factories)
    except ConfigError:
        return  # that point is rejected at plan time like any other; the rest may be fine
    if not config.stages or config.stages[-1].kind != "export":
        raise ConfigError("a search compares bundles: its stages must end with export "
                          f"(they are {', '.join(s.id for s in config.stages) or 'empty'})")
    api.load_datasets(config, [s.instantiate() for s in config.stages])  # InputError: data missing


def _jobs(ctx: SearchContext, points: list[dict[str, Any]]) -> list[TrialJob]:
    jobs, seen = [], set()
    for point in points:
        tid = ctx.trial_id(point)
        if tid in seen:
            continue  # random over a small list space: a point drawn twice runs once
        seen.add(tid)
        jobs.append(TrialJob(number=len(jobs), point=point, id=tid))
    return jobs


def _with_shared_prefixes(ctx: SearchContext, jobs: list[TrialJob]) -> list[TrialJob]:
    """For trials running at once: each stage prefix (train; train+prune; ...) that two pending trials
    have in common, so the first to reach it builds it and the others wait for the cache."""
    names: dict[str, list[tuple[int, str]]] = {}
    counts: dict[str, int] = {}
    for job in jobs:
        try:
            config = resolve(ctx.base, job.point, ctx.factories)
        except ConfigError:
            continue
        levels = [(k, prefix_lock_name(config, k, ctx.threads)) for k in range(1, len(config.stages))
                  if not any(s.instantiate().target_dependent for s in config.stages[:k])]
        names[job.id] = levels
        for _, name in levels:
            counts[name] = counts.get(name, 0) + 1
    return [TrialJob(j.number, j.point, j.id, tuple((k, n) for k, n in names.get(j.id, []) if counts[n] > 1))
            for j in jobs]


# -- tpe -------------------------------------------------------------------------------------------

def _tpe(ctx: SearchContext, spec: sp.SearchConfig, finished: dict[str, dict[str, Any]], report: Progress,
         use_ray: bool, ray_address: str | None, ray_cpus: int | None, console: Console) -> list[dict[str, Any]]:
    """Embedded: Optuna ask / tell, one trial at a time. A restarted search replays the same seeded
    sampler: each proposal it has already run is told its stored result instead of running again, so
    the run continues exactly as an uninterrupted one would. On Ray: Tune's OptunaSearch on a study
    that already holds the finished trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = sp.optuna_distributions(spec)
    directions = ["maximize" if d == "max" else "minimize" for _, d in spec.primary]
    primary = ctx.targets[0]
    known = []  # finished trials of this very search (the store checked them), in their order
    for record in sorted(finished.values(), key=lambda r: (r["number"], r["id"])):
        params = sp.params_from_point(spec, record["point"])  # None unless the space draws exactly this point
        if params is not None:
            known.append((record, params))
    known = known[: spec.trials]
    total = spec.trials or 0
    console.print(f"trials  {total} ({len(known)} finished before, reused)")
    ordered: list[dict[str, Any]] = []
    if use_ray:
        remaining = total - len(known)
        report.total = remaining
        storage = optuna.storages.InMemoryStorage()
        # a fresh seed per restart: the same one would first propose the finished points again
        sampler = optuna.samplers.TPESampler(seed=spec.seed + len(known))
        study = optuna.create_study(storage=storage, study_name="edgec-search", directions=directions, sampler=sampler)
        for record, params in known:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                      values=objective_values(record, primary, spec.objectives)))
        ordered = [record for record, _ in known]
        if remaining > 0:
            backend_ = _ray_backend()
            with backend_.ray_session(ray_address, ray_cpus, console) as info:
                report.ray_info = info
                ordered += backend_.run_tpe(ctx, spec, storage, sampler, dists, remaining, len(known), finished, report)
    else:
        report.total = total - len(known)
        study = optuna.create_study(directions=directions, sampler=optuna.samplers.TPESampler(seed=spec.seed))
        for number in range(total):
            trial = study.ask(dists)
            point = sp.point_from_params(spec, trial.params)
            job = TrialJob(number=number, point=point, id=ctx.trial_id(point))
            record = reuse(finished, job) or report.records.get(job.id)
            if record is None:
                record = run_trial(ctx, job)
                report(record)
            study.tell(trial, objective_values(record, primary, spec.objectives))
            ordered.append({**record, "number": number})
    unique: dict[str, dict[str, Any]] = {}
    for number, record in enumerate(ordered):
        unique.setdefault(record["id"], {**record, "number": number})
    return list(unique.values())


