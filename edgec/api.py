"""The Python API: ``edgec.api.build(config, target=..., out=..., cache_dir=...) -> BuildResult``.

The CLI is a thin layer over this. A build resolves its inputs, checks the whole chain (every
stage's ``check`` on the real model, data and target) before any stage runs, runs the chain
through the stage cache and publishes ``<out>/<target>/`` atomically. No global state: a worker
process may call it with its own console, cache and output folder.
"""

from __future__ import annotations

import errno
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from rich.console import Console

from edgec.base.architecture import ModelTrust
from edgec.pipeline.accuracy_budget import measure as measure_budget
from edgec.pipeline.accuracy_budget import refuse_over_budget, resolve_budget
from edgec.pipeline.artifact import BUNDLE, CHECKPOINT_FILE
from edgec.pipeline.artifact import copy_artifact_verified, copy_verified
from edgec.pipeline.cache import StageCache
from edgec.pipeline.manifest import MANIFEST, write_lineage
from edgec.pipeline.publish import publish_directory
from edgec.pipeline.runner import check_chain, plan_status, run_chain
from edgec.pipeline.source import make_source
from edgec.pipeline.stage import Stage, StageContext
from edgec.targets.profile import TargetProfile, load_target
from edgec.zoo import ZOO, default_model

from .build_layout import BUILD_FILE, BUNDLE_DIR, MODEL_FILE, REFERENCE_FILE, UNCOMPRESSED_FILE
from .config import MAIN_DATA, BuildConfig, DataSpec, parse_config
from .base.data import Dataset, load_dataset
from .data_views import permute_features, select_classes
from .base.errors import ConfigError, InputError
from .output_dir import check_output_locations



@dataclass(frozen=True)
class StageResult:
    id: str
    kind: str
    key: str
    cached: bool
    seconds: float
    info: dict[str, Any]


@dataclass(frozen=True)
class BuildResult:
    build_dir: Path
    bundle: Path | None  # None when the chain ends on a model (then build_dir/model.pt)
    stages: list[StageResult]
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)  # the bundle's manifest metrics
    summary: dict[str, Any] = field(default_factory=dict)  # what build.json holds

    @property
    def stages_run(self) -> int:
        return sum(not s.cached for s in self.stages)


def build(
    config: BuildConfig | Mapping[str, Any],
    *,
    target: str | None = None,
    out: Path | None = None,
    cache_dir: Path | None = None,
    console: Console | None = None,
    force: str | None = None,
) -> BuildResult:
    """Run a build. ``config`` is a BuildConfig or the same keys as edgec.toml, as a dict;
    ``target``, ``out`` and ``cache_dir`` override the config's. ``force`` reruns that stage (id or
    kind) and every stage after it."""
    if not isinstance(config, BuildConfig):
        config = parse_config(dict(config))
    updates = {k: v for k, v in (("target", target), ("out", out), ("cache_dir", cache_dir)) if v is not None}
    config = config.model_copy(update=updates)
    console = console or Console(quiet=True)
    profile = load_target(config.target)
    check_output_locations(config.out, profile.name, config.cache_dir)
    created_out = not config.out.exists()
    _check_writable(config.out)
    _check_writable(config.cache_dir)
    try:
        return _build(config, profile, console, force)
    except BaseException:
        if created_out and config.out.is_dir() and not any(config.out.iterdir()):
            config.out.rmdir()  # leave nothing behind from a build that never produced anything
        raise


def model_trust(config: BuildConfig) -> ModelTrust:
    """The factories the user named (the model, distillation students): the only code a file may
    ask edgec to import."""
    names = {config.model.name} | {getattr(s.config, "student", None) for s in config.stages}
    return ModelTrust(frozenset(n for n in names if n and n not in ZOO))


def load_datasets(config: BuildConfig, stages: list[Stage]) -> dict[str, Dataset]:
    """The main data set and every named one a stage reads (loaded once each)."""
    main = config.data
    loaded = {MAIN_DATA: _load_view(main, main.source, "data", config.task, config.cache_dir)}
    task_data = {t.data for t in config.tasks if t.data != MAIN_DATA}  # [[tasks]]: stages may read any task's data
    for name in sorted({s.config.data for s in stages if s.config.data} | task_data):
        spec = main.named[name]
        loaded[name] = _load_view(spec, spec.source or main.source, f"data.{name}", config.task, config.cache_dir)
    return loaded


def _load_view(spec: DataSpec, source: str, where: str, task: str = "classification",
               cache_dir: Path | None = None) -> Dataset:
    if task != "classification":  # regression / reconstruction (pipeline/objectives.py)
        data = load_dataset(source, spec.val_fraction, spec.image_size, task=task, normal=spec.normal,
                            input_noise=spec.input_noise, cache_dir=cache_dir)
    else:
        data = load_dataset(source, spec.val_fraction, spec.image_size, cache_dir=cache_dir)
    if spec.classes is not None:
        data = select_classes(data, spec.classes, where)
    if spec.permute is not None:
        data = permute_features(data, spec.permute)
    return data


@dataclass
class _Prepared:
    stages: list[Stage]
    datasets: dict[str, Dataset]
    source: Any
    ctx: StageContext
    cache: StageCache


def _prepare(config: BuildConfig, profile: TargetProfile, console: Console) -> _Prepared:
    """Everything up to running stages: data, the source model, and the whole chain checked."""
    stages = [spec.instantiate() for spec in config.stages]
    trust = model_trust(config)
    if config.sign_key is not None:
        from edgec.signing import load_private_key

        load_private_key(config.sign_key)  # a bad key must not cost a training run
    cache = StageCache(config.cache_dir, on_discard=lambda stage, key, reason: console.print(
        f"[yellow]note[/] cache entry {stage}/{key[:12]} refused ({reason}): rebuilding it"))
    datasets = load_datasets(config, stages)
    main = datasets[MAIN_DATA]
    console.print(f"data   {main.summary()}")
    for name, data in datasets.items():
        if name != MAIN_DATA:
            console.print(f"data.{name}  {data.summary()}")
    first_data = datasets[stages[0].config.data] if stages and stages[0].config.data else main
    model_name = config.model.name
    if "name" not in config.model.model_fields_set and config.model.weights is None:
        model_name = default_model(first_data.input_shape)  # none named: one that fits the data's shape
    source = make_source(model_name, config.model.args, config.model.weights, first_data, config.seed, cache, trust)
    ctx = StageContext(data=main, seed=config.seed, target=profile, console=console, trust=trust, datasets=datasets,
                       tasks={t.name: t.data for t in config.tasks},
                       budget_pt=resolve_budget(config.budget.max_accuracy_drop, profile)[0])
    with console.status("checking the plan"):
        check_chain(stages, source, ctx, datasets)
    return _Prepared(stages, datasets, source, ctx, cache)


def check(config: BuildConfig | Mapping[str, Any], *, target: str | None = None, cache_dir: Path | None = None,
          console: Console | None = None) -> list[dict[str, Any]]:
    """Validate a build without running it: config, data, model, every stage's ``check`` against the
    target. Returns the plan, one ``{"id", "kind", "cached"}`` per stage. Raises what ``build``
    would raise before running any stage (ConfigError / InputError)."""
    if not isinstance(config, BuildConfig):
        config = parse_config(dict(config))
    updates = {k: v for k, v in (("target", target), ("cache_dir", cache_dir)) if v is not None}
    config = config.model_copy(update=updates)
    prepared = _prepare(config, load_target(config.target), console or Console(quiet=True))
    return plan_status(prepared.stages, prepared.source, prepared.ctx, prepared.cache, prepared.datasets)


def _build(config: BuildConfig, profile: TargetProfile, console: Console, force: str | None) -> BuildResult:
    start = time.perf_counter()
    prepared = _prepare(config, profile, console)
    stages, datasets, source, ctx, cache = (prepared.stages, prepared.datasets, prepared.source, prepared.ctx,
                                             prepared.cache)
    main = datasets[MAIN_DATA]
    force_from = _force_index(stages, force)
    steps = run_chain(stages, source, ctx, cache, force_from, datasets)

    canonical = config.canonical()
    summary = {
        "target": profile.name,
        "data": main.summary(),
        "datasets": {name: d.summary() for name, d in datasets.items()},
        "seed": config.seed,
        "source": {"digest": source.digest, **source.info},
        "stages": [
            {"stage": s.id, "id": s.id, "kind": s.kind, "key": s.key, "cached": s.cached, "seconds": round(s.seconds, 3),
             "info": s.artifact.info}
            for s in steps
        ],
        "config": canonical,
        "reached_bundle": compression_reaching_the_end(stages, steps),
    }
    budget_pt, budget_source = resolve_budget(config.budget.max_accuracy_drop, profile)
    record = measure_budget(steps, source, main, ctx.trust, budget_pt, budget_source, config.budget.enforce)
    if record is not None:
        summary["accuracy_budget"] = record
        refuse_over_budget(record)  # never publish a bundle below the budget as a passing build
    final_dir = config.out / profile.name
    artifacts = [source] + [s.artifact for s in steps]
    first_compressed = next((i for i, stage in enumerate(stages) if stage.compresses), len(stages) - 1)
    _publish(final_dir, artifacts, summary, config, uncompressed=artifacts[first_compressed])
    bundle = final_dir / BUNDLE_DIR if artifacts[-1].kind == BUNDLE else None
    metrics = json.loads((bundle / MANIFEST).read_text()).get("metrics", {}) if bundle else {}
    results = [StageResult(s.id, s.kind, s.key, s.cached, s.seconds, s.artifact.info) for s in steps]
    return BuildResult(final_dir, bundle, results, time.perf_counter() - start, metrics, summary)


def compression_reaching_the_end(stages: list[Stage], steps: list) -> list[str]:
    """Which compression is in the final model, as each stage describes it (``Stage.reached_bundle``):
    a distill stage starts a fresh student, so pruning or sharing done on its teacher does not reach
    the bundle."""
    reached: list[str] = []
    for stage, step in zip(stages, steps):
        reached = stage.reached_bundle(step.artifact.info, reached)
    return reached


def _force_index(stages: list[Stage], force: str | None) -> int | None:
    if force is None:
        return None
    for i, stage in enumerate(stages):
        if force in (stage.id, stage.kind):
            return i
    raise ConfigError(f"--force {force}: not in this build's stages ({', '.join(s.id for s in stages)})")


def _check_writable(folder: Path) -> None:
    """Fail before any work when the output or cache folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"cannot write to {folder} ({e.strerror}); choose another folder with --out / --cache-dir") from None


def _publish(final_dir: Path, artifacts: list, summary: dict[str, Any], config: BuildConfig, uncompressed) -> None:
    """build.json, the bundle (when the chain exports, with its lineage, signed when a key is
    given) and the model that went into export as reference.pt (``edgec bench --reference`` times
    it), the model before the first compression stage as uncompressed.pt (``edgec bench --baseline``
    exports and times it); or model.pt when the chain ends on a model. Every byte copied from the
    cache is checked against the entry's authenticated hashes, so what is signed and published is
    what this run built or authenticated. A full disk is one OSError naming ``final_dir``; the
    previous build stays in place."""

    def fill(tmp: Path) -> None:
        if artifacts[-1].kind == BUNDLE:
            copy_artifact_verified(artifacts[-1], tmp / BUNDLE_DIR)
            write_lineage(tmp / BUNDLE_DIR / MANIFEST, summary["stages"], summary["config"]["stages"],
                          summary.get("accuracy_budget"))
            if config.sign_key is not None:
                from edgec.signing import sign_bundle

                sign_bundle(tmp / BUNDLE_DIR, config.sign_key)
            copy_verified(artifacts[-2], CHECKPOINT_FILE, tmp / REFERENCE_FILE)
            copy_verified(uncompressed, CHECKPOINT_FILE, tmp / UNCOMPRESSED_FILE)
        else:
            copy_verified(artifacts[-1], CHECKPOINT_FILE, tmp / MODEL_FILE)
        (tmp / BUILD_FILE).write_text(json.dumps(summary, indent=2) + "\n")

    try:
        publish_directory(final_dir, fill)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, e.strerror, str(final_dir)) from None
        raise
