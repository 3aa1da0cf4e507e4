"""The Ray backend of ``edgec search``: a Ray session (a local cluster, or one joined by address) and
Ray Tune running each trial in a worker with its resources (``cpus_per_trial``, ``gpus_per_trial``).
Imported only when a search runs on Ray.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard / CSV files per trial
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no progress tables on stdout

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.logger import JsonLoggerCallback  # noqa: E402
from rich.console import Console

from edgec.base.errors import InputError

from . import space as sp
from .progress import Progress, objective_values
from .records import reuse
from .trial import SearchContext, TrialJob, run_trial

RAY_OBJECT_STORE_BYTES = 200 * 1024**2
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TF_CPP_MIN_LOG_LEVEL": "2"}
_REPORTERS: dict[str, Any] = {}  # Tune pickles its run config: callbacks find this search's reporter here


class StoreRecords(tune.Callback):
    """Runs in the driver: each finished trial's record is stored here, even from a remote node."""

    def __init__(self, key: str):
        self.key = key

    def on_trial_result(self, iteration, trials, trial, result, **info):
        reporter = _REPORTERS.get(self.key)
        if reporter is not None and "record" in result:
            reporter(json.loads(result["record"]))


@contextmanager
def ray_session(address: str | None, cpus: int | None, console: Console) -> Iterator[dict[str, Any]]:
    """A Ray session for the search: an existing one in this process is used as it is; ``address``
    joins a running cluster; otherwise a local cluster with ``cpus`` CPUs (no dashboard, a small object
    store) is started, and shut down afterwards."""
    started = False
    if not ray.is_initialized():
        runtime_env = {"env_vars": WORKER_ENV}
        try:
            if address:
                ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
            else:
                ray.init(num_cpus=cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                         object_store_memory=RAY_OBJECT_STORE_BYTES, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise InputError(f"could not start or join {where}: {str(e).splitlines()[0] if str(e) else e}") from None
        started = True
    resources = ray.cluster_resources()
    info = {"address": address or "local", "started_here": started, "cpus": int(resources.get("CPU", 0)),
            "gpus": int(resources.get("GPU", 0)), "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "ray_version": ray.__version__}
    console.print(f"ray     {info['address']}: {info['nodes']} node(s), {info['cpus']} CPU(s), {info['gpus']} GPU(s)")
    try:
        yield info
    finally:
        if started:
            ray.shutdown()


def trial_fn(config: dict[str, Any], ctx: SearchContext, spec: sp.SearchConfig, jobs: dict[int, TrialJob],
             offset: int, finished: dict[str, dict[str, Any]]) -> None:
    """One Tune trial, in a Ray worker: a grid / random job by number, or a tpe suggestion."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    if "number" in config:
        job = jobs[int(config["number"])]
    else:
        point = sp.point_from_params(spec, config)
        trial_id = tune.get_context().get_trial_id() or ""
        suffix = trial_id.rsplit("_", 1)[-1]
        number = offset + (int(suffix) if suffix.isdigit() else 0)
        job = TrialJob(number=number, point=point, id=ctx.trial_id(point))
    record = reuse(finished, job) or run_trial(ctx, job)
    record = {**record, "number": job.number}
    scalars = dict(zip((f"objective_{n}" for n in spec.objectives),
                       objective_values(record, ctx.targets[0], spec.objectives)))
    tune.report({"record": json.dumps(record), **scalars})


def _tune_run(ctx: SearchContext, spec: sp.SearchConfig, fn: Callable, report: Progress, *,
              param_space: dict[str, Any] | None = None, search_alg: Any = None, num_samples: int = 1) -> list[dict]:
    resources = {"cpu": spec.cpus_per_trial}
    if spec.gpus_per_trial:
        resources["gpu"] = spec.gpus_per_trial
    key = f"{os.getpid()}-{id(report)}"
    _REPORTERS[key] = report
    tuner = tune.Tuner(
        tune.with_resources(fn, resources),
        param_space=param_space or {},
        tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=num_samples,
                                    max_concurrent_trials=spec.max_concurrent),
        run_config=tune.RunConfig(name=f"search-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                  storage_path=str(ctx.out / ".ray"), verbose=0, callbacks=[StoreRecords(key), JsonLoggerCallback()],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    try:
        results = tuner.fit()
    finally:
        _REPORTERS.pop(key, None)
    records = []
    for result in results:
        metrics = result.metrics or {}
        if "record" in metrics:
            record = json.loads(metrics["record"])
            report(record)
            records.append(record)
        elif result.error is not None:
            report.errors.append({"id": "?", "reason": f"{type(result.error).__name__}: {result.error}"})
    return records


def run_grid(ctx: SearchContext, spec: sp.SearchConfig, jobs: list[TrialJob], report: Progress) -> None:
    fn = tune.with_parameters(trial_fn, ctx=ctx, spec=spec, jobs={j.number: j for j in jobs}, offset=0, finished={})
    _tune_run(ctx, spec, fn, report, param_space={"number": tune.grid_search([j.number for j in jobs])})


def run_tpe(ctx: SearchContext, spec: sp.SearchConfig, storage, sampler, dists: dict[str, Any], remaining: int,
             offset: int, finished: dict[str, dict[str, Any]], report: Progress) -> list[dict[str, Any]]:
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=dists, metric=[f"objective_{n}" for n in spec.objectives],
                            mode=[d for _, d in spec.primary], sampler=sampler, storage=storage,
                            study_name="edgec-search")
    if spec.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)
    fn = tune.with_parameters(trial_fn, ctx=ctx, spec=spec, jobs={}, offset=offset, finished=finished)
    records = _tune_run(ctx, spec, fn, report, search_alg=searcher, num_samples=remaining)
    return sorted(records, key=lambda r: r["number"])
