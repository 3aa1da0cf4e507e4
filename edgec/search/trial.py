"""One trial: a point of the space -> config -> plan-time check per target (an invalid point is
rejected here, before any training) -> ``edgec.api.build`` -> the bundle's validation accuracy in
its runtime and its p50 latency with the bench harness -> a JSON record.

A trial runs in the process that calls :func:`run_trial`: the search driver (embedded) or a Ray
worker. Either way torch uses ``threads`` threads (every stage's cache key includes the thread
count, so the same point gives byte-identical models, and the same record, in both modes).
"""

from __future__ import annotations

import copy
import fcntl
import json
import shutil
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgec.base.errors import ConfigError, EdgecError, InputError
from edgec.ondevice.integrity import MANIFEST_NAME

RECORD_SCHEMA = "edgec-search-trial"
BUILDS_DIR = "builds"  # OUT/builds/<trial id>/<target>/: each trial's build directories
LOCK_DIR = ".search-locks"  # inside the stage cache: every node that shares the cache shares the locks


@dataclass(frozen=True)
class SearchContext:
    """What every trial of one search shares (picklable: it travels to Ray workers)."""

    base: dict[str, Any]  # the build config (edgec.toml keys) without [search], CLI overrides applied
    targets: tuple[str, ...]
    out: Path  # absolute; trials build into out/builds/<trial id>/
    cache_dir: Path  # absolute; the stage cache every trial shares
    threads: int
    latency: dict[str, Any]
    coordinate: bool = False  # concurrent trials: build shared stage prefixes once, under a lock
    factories: frozenset[str] = frozenset()  # the model factories the search config names (named_factories)

    def trial_id(self, point: dict[str, Any]) -> str:
        from edgec.pipeline.cache import stable_hash

        return stable_hash({"schema": RECORD_SCHEMA, "base": self.base, "point": point, "targets": list(self.targets),
                            "threads": self.threads, "latency": self.latency})[:16]


@dataclass(frozen=True)
class TrialJob:
    number: int
    point: dict[str, Any]
    id: str
    # (stage count, lock name) of each stage prefix this trial shares with another pending trial
    shared_prefixes: tuple[tuple[int, str], ...] = field(default_factory=tuple)


def named_factories(base: dict[str, Any], space: dict[str, Any]) -> frozenset[str]:
    """Every string of the search config (its build config and its space's values): a model factory
    a point builds must be one of them, so no file can name code for a search to import."""
    found: set[str] = set()
    todo: list[Any] = [base, *(v for v in space.values() if isinstance(v, list))]
    while todo:
        value = todo.pop()
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, dict):
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
    return frozenset(found)


def resolve(base: dict[str, Any], point: dict[str, Any], factories: frozenset[str]):
    """The BuildConfig of a point (raises ConfigError: such a point is rejected at plan time), which
    may name only the model factories in ``factories`` (what the user's search config names)."""
    from edgec.api import model_trust
    from edgec.config import Overrides, parse_config

    config = parse_config(copy.deepcopy(base), Overrides(dict(point), {}))
    require_classification(config.task)
    if "enforce" not in config.budget.model_fields_set:
        # a search maps the trade-off: a point over the accuracy budget is measured and marked, not refused
        config.budget.enforce = False
    unnamed = sorted(model_trust(config).factories - factories)
    if unnamed:
        raise ConfigError(f"the point names the model factory {unnamed[0]!r}, which the search config does not: "
                          "edgec imports only the factories you name")
    return config


def require_classification(task: str) -> None:
    """A search ranks bundles by their top-1 accuracy (selection, the front, best.toml, the report): it
    has no figure for other tasks yet, so it refuses them at plan time instead of training for nothing."""
    if task != "classification":
        raise ConfigError(f"edgec search ranks classifiers by top-1 accuracy; this config's task is {task!r}, which it "
                          "cannot rank yet: compare points with edgec build --set KEY=VALUE (each records its "
                          "r2 / auc / mse)")


def portable_config(config) -> dict[str, Any]:
    """The resolved config as a build would take it, without this machine's out / cache folders."""
    canonical = config.canonical()
    for key in ("out", "cache_dir", "target"):
        canonical.pop(key, None)
    return canonical


def prefix_lock_name(config, k: int, threads: int) -> str:
    from edgec.pipeline.cache import stable_hash

    canonical = portable_config(config)
    return stable_hash({**canonical, "stages": canonical["stages"][:k], "threads": threads})[:24]


def run_trial(ctx: SearchContext, job: TrialJob, console=None) -> dict[str, Any]:
    """Run one trial; never raises for a bad point or a failed build (the record says why)."""
    import torch

    start = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(ctx.threads)
    record: dict[str, Any] = {
        "schema": RECORD_SCHEMA, "id": job.id, "number": job.number, "point": job.point, "status": "ok",
        "reason": None, "config": None, "threads": ctx.threads, "targets": {}, "stage_steps": 0, "stage_runs": 0,
    }
    try:
        _run(ctx, job, record, console)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a bug or the machine: the record says so, the search goes on
        record["status"] = "error"
        record["reason"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc(limit=20)
    finally:
        torch.set_num_threads(previous)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _run(ctx: SearchContext, job: TrialJob, record: dict[str, Any], console) -> None:
    from edgec import api

    try:
        config = resolve(ctx.base, job.point, ctx.factories)
    except ConfigError as e:
        record.update(status="rejected", reason=str(e))
        record["targets"] = {t: _rejected(str(e)) for t in ctx.targets}
        return
    record["config"] = portable_config(config)
    build_root = ctx.out / BUILDS_DIR / job.id
    config = config.model_copy(update={"cache_dir": ctx.cache_dir, "out": build_root})
    if not config.stages or config.stages[-1].kind != "export":
        raise ConfigError("a search needs a chain that ends with the export stage (it compares bundles)")

    plans: dict[str, list[dict]] = {}
    for target in ctx.targets:
        try:  # plan time: config, data, model and every stage's check against this target; no training
            plans[target] = api.check(config, target=target, cache_dir=ctx.cache_dir)
        except (ConfigError, InputError) as e:
            record["targets"][target] = _rejected(str(e))
    if not plans:
        record.update(status="rejected", reason=next(iter(record["targets"].values()))["reason"])
        return

    if ctx.coordinate and job.shared_prefixes:
        ran = _build_shared_prefixes(ctx, config, job, next(iter(plans)), build_root)
        record["stage_runs"] += ran
        if ran:  # what is cached now, so that a failed build below counts only what it ran itself
            plans = {t: api.check(config, target=t, cache_dir=ctx.cache_dir) for t in plans}

    datasets = None
    # leading stages that do not depend on the target: one target's build caches them for the next
    shared = next((i for i, s in enumerate(config.stages) if s.instantiate().target_dependent), len(config.stages))
    known_cached = 0
    for target, plan in plans.items():
        try:
            result = api.build(config, target=target, out=build_root, cache_dir=ctx.cache_dir, console=console)
        except EdgecError as e:  # a stage failed (the export refused to ship, a loss diverged, ...)
            after = api.check(config, target=target, cache_dir=ctx.cache_dir)
            cached_before = max(sum(row["cached"] for row in plan), known_cached)
            cached_after = sum(row["cached"] for row in after)
            known_cached = min(cached_after, shared)
            record["stage_steps"] += cached_after + 1
            record["stage_runs"] += max(0, cached_after - cached_before) + 1
            record["targets"][target] = {"status": "failed", "feasible": False, "reason": str(e), "metrics": {},
                                         "stages": [], "bundle": None}
            continue
        known_cached = shared
        record["stage_steps"] += len(result.stages)
        record["stage_runs"] += result.stages_run
        if datasets is None:
            datasets = api.load_datasets(config, [spec.instantiate() for spec in config.stages])
        record["targets"][target] = _measure(ctx, config, result, datasets, target)
    built = [t for t in record["targets"].values() if t["status"] == "ok"]
    if not built:
        record.update(status="failed", reason=next(t["reason"] for t in record["targets"].values() if t["reason"]))


def _rejected(reason: str) -> dict[str, Any]:
    return {"status": "rejected", "feasible": False, "reason": reason, "metrics": {}, "stages": [], "bundle": None}


def _measure(ctx: SearchContext, config, result, datasets, target: str) -> dict[str, Any]:
    """Accuracy (validation split, in the bundle's runtime: what selection may use; the test split's
    from the manifest: what is reported), sizes, and the harness's p50 / p95 at batch 1 here."""
    from edgec.config import MAIN_DATA

    manifest = json.loads((result.bundle / MANIFEST_NAME).read_text())
    stages = [{"id": s.id, "kind": s.kind, "key": s.key, "cached": s.cached, "seconds": round(s.seconds, 3)}
              for s in result.stages]
    export = config.stages[-1]
    data = datasets[export.config.data or MAIN_DATA]
    val_accuracy = bundle_accuracy(result.bundle, data.x_val, data.y_val, ctx.threads)
    latency = bench_latency(result.bundle, ctx.threads, ctx.latency)
    model_stages = [s for s in result.stages if "val_accuracy" in s.info]
    size, metrics = manifest["size"], manifest["metrics"]
    figures = {
        "accuracy": val_accuracy,
        "test_accuracy": metrics["accuracy"],
        "reference_val_accuracy": model_stages[-1].info["val_accuracy"] if model_stages else None,
        "reference_test_accuracy": metrics["reference_accuracy"],
        "trained_val_accuracy": model_stages[0].info["val_accuracy"] if model_stages else None,
        "top1_agreement": metrics["top1_agreement"],
        "model_bytes": size["model_bytes"],
        "transport_bytes": size["transport_bytes"],
        "fp32_bytes": size["reference_fp32_bytes"],
        "ratio": size["reference_fp32_bytes"] / size["transport_bytes"],
        "p50_ms": latency["p50_ms"],
        "p95_ms": latency["p95_ms"],
        "val_samples": int(len(data.y_val)),
        "test_samples": metrics.get("test_samples"),
        "within_accuracy_budget": (manifest.get("accuracy_budget") or {}).get("met"),
    }
    return {
        "status": "ok", "feasible": True, "reason": None, "metrics": figures, "latency": latency,
        "precision": manifest["precision"],
        "stages": stages,
        "bundle": str(result.bundle.relative_to(ctx.out)) if result.bundle.is_relative_to(ctx.out) else str(result.bundle),
    }


def bundle_accuracy(bundle: Path, x_raw, y, threads: int) -> float:
    """Top-1 accuracy of the bundle in its runtime (the on-device code path: raw -> preprocessing ->
    model), e.g. on the validation split, which the bundle does not ship."""
    import numpy as np

    from edgec.ondevice import load_bundle

    loaded = load_bundle(str(bundle))
    model = loaded.open_model(runtime_settings(loaded.runtime_name, threads))
    try:
        logits = model.predict_raw(x_raw)
    finally:
        model.close()
    return float((np.asarray(logits).argmax(1) == np.asarray(y)).mean())


def runtime_settings(runtime_name: str, threads: int) -> dict[str, Any]:
    """Threads = the trial's CPUs; an ONNX bundle runs on onnxruntime-gpu's CUDA provider where this
    machine has one (the desktop-gpu target), else on the CPU."""
    settings: dict[str, Any] = {"threads": threads}
    if runtime_name == "onnxruntime":
        settings["provider"] = "CUDAExecutionProvider" if "CUDAExecutionProvider" in onnx_providers() else "CPUExecutionProvider"
    return settings


def onnx_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def bench_latency(bundle: Path, threads: int, options: dict[str, Any]) -> dict[str, Any]:
    """The bench harness at batch 1 with the trial's threads, ``repeats`` times in fresh processes;
    the lowest p50 is kept (load from other processes only ever adds time)."""
    from edgec.ondevice import bench_bundle, load_bundle

    settings = runtime_settings(load_bundle(str(bundle)).runtime_name, threads)
    runs = []
    for _ in range(int(options.get("repeats", 3))):
        res = bench_bundle(str(bundle), warmup=int(options.get("warmup", 10)), runs=int(options.get("runs", 200)),
                           min_seconds=float(options.get("min_seconds", 0.3)), sweep=False, batch_sizes=(1,),
                           settings=settings, accuracy=False, max_seconds=30.0)
        if not res.get("ok"):
            raise RuntimeError(f"bench failed on {bundle}: {'; '.join(res.get('errors') or ['no setting ran'])}")
        runs.append(res)
    best = min(runs, key=lambda r: r["latency_ms"]["p50"])
    effective = best["settings"][0].get("effective_settings") or best["recommended"]
    return {
        "p50_ms": best["latency_ms"]["p50"], "p95_ms": best["latency_ms"]["p95"],
        "p50_ms_all": [r["latency_ms"]["p50"] for r in runs],
        "runtime": f"{best['runtime']['package']} {best['runtime']['version']}",
        "settings": effective, "notes": best.get("notes") or [],
    }


def _build_shared_prefixes(ctx: SearchContext, config, job: TrialJob, target: str, build_root: Path) -> int:
    """Concurrent trials: each stage prefix shared with another trial is built by whichever trial
    takes its lock first; the others then find it in the cache (a common prefix runs once)."""
    from edgec import api

    ran = 0
    for k, name in sorted(job.shared_prefixes):
        prefix = config.model_copy(update={"stages": config.stages[:k]})
        with _locked(ctx.cache_dir / LOCK_DIR / f"{name}.lock"):
            try:
                if all(row["cached"] for row in api.check(prefix, target=target, cache_dir=ctx.cache_dir)):
                    continue
                build_root.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=".prefix-", dir=build_root))
                try:
                    result = api.build(prefix, target=target, out=tmp, cache_dir=ctx.cache_dir)
                    ran += result.stages_run
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            except EdgecError:
                return ran  # the full build meets the same error and records it
    return ran


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
