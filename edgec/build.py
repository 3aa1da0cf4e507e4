"""``edgec build``: resolve inputs, run the stage chain, publish the build directory atomically.

The build directory ``<out>/<target>/`` holds ``bundle/`` (what ships to the device) and
``build.json`` (what every stage did, with timings). It is assembled in a temp dir beside it and
swapped in at the end, so a failed build leaves the previous result (or nothing) behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from edgec.pipeline.artifact import BUNDLE, CHECKPOINT_FILE
from edgec.pipeline.cache import StageCache
from edgec.pipeline.export import MANIFEST
from edgec.pipeline.registry import IMPLEMENTED, PLANNED
from edgec.pipeline.runner import StepResult, run_chain
from edgec.pipeline.source import make_source
from edgec.pipeline.stage import StageContext
from edgec.targets.profile import load_target

from .config import BuildConfig
from .data import load_dataset
from .errors import ConfigError, InputError

BUILD_FILE = "build.json"
REFERENCE_FILE = "reference.pt"
BUNDLE_DIR = "bundle"


@dataclass
class BuildResult:
    build_dir: Path
    steps: list[StepResult]
    seconds: float
    summary: dict[str, Any]


def build(config: BuildConfig, console: Console, force: str | None = None) -> BuildResult:
    target = load_target(config.target)
    created_out = not config.out.exists()
    _check_writable(config.out)
    _check_writable(config.cache_dir)
    try:
        return _build(config, target, console, force)
    except BaseException:
        if created_out and config.out.is_dir() and not any(config.out.iterdir()):
            config.out.rmdir()  # leave nothing behind from a build that never produced anything
        raise


def _build(config: BuildConfig, target, console: Console, force: str | None) -> BuildResult:
    start = time.perf_counter()
    final_dir = config.out / target.name

    stages = []
    for name in config.stages:
        if name in PLANNED:
            console.print(f"[yellow]skip[/]   {name}: not implemented in this edgec version")
            continue
        cls = IMPLEMENTED[name]
        stages.append(cls(config.stage_config(name)))
    force_from = None
    if force is not None:
        names = [s.name for s in stages]
        if force not in names:
            raise ConfigError(f"--force {force}: not in this build's stages ({', '.join(names)})")
        force_from = names.index(force)

    data = load_dataset(config.data.source, config.data.val_fraction, config.data.image_size)
    console.print(f"data   {data.summary()}")
    cache = StageCache(config.cache_dir)
    source = make_source(config.model.name, config.model.args, config.model.weights, data, config.seed, cache)
    ctx = StageContext(data=data, seed=config.seed, target=target, console=console)
    steps = run_chain(stages, source, ctx, cache, force_from)

    summary = {
        "target": target.name,
        "data": data.summary(),
        "seed": config.seed,
        "source": {"digest": source.digest, **source.info},
        "stages": [
            {"stage": s.stage, "key": s.key, "cached": s.cached, "seconds": round(s.seconds, 3), "info": s.artifact.info}
            for s in steps
        ],
        "config": config.model_dump(mode="json"),
    }
    _publish(final_dir, steps, source, summary)
    return BuildResult(final_dir, steps, time.perf_counter() - start, summary)


def _check_writable(folder: Path) -> None:
    """Fail before any work when the output or cache folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"cannot write to {folder} ({e.strerror}); choose another folder with --out / --cache-dir") from None


def _write_lineage(manifest_path: Path, summary: dict[str, Any]) -> None:
    """The manifest's lineage names every stage with its config and cache key. The manifest is
    not in its own file table, so this does not disturb the recorded hashes."""
    manifest = json.loads(manifest_path.read_text())
    manifest["lineage"] = [
        {"stage": s["stage"], "config": summary["config"].get(s["stage"]), "cache_key": s["key"]} for s in summary["stages"]
    ]
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _publish(final_dir: Path, steps: list[StepResult], source, summary: dict[str, Any]) -> None:
    """build.json, the bundle (when the chain exports) and the model that went into export as
    reference.pt (``edgec bench --reference`` times it); or model.pt when the chain ends on a model."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}-", dir=final_dir.parent))
    try:
        artifacts = [source] + [s.artifact for s in steps]
        if artifacts[-1].kind == BUNDLE:
            shutil.copytree(artifacts[-1].path, tmp / BUNDLE_DIR, ignore=shutil.ignore_patterns("entry.json"))
            _write_lineage(tmp / BUNDLE_DIR / MANIFEST, summary)
            shutil.copy2(artifacts[-2].path / CHECKPOINT_FILE, tmp / REFERENCE_FILE)
        else:
            shutil.copy2(artifacts[-1].path / CHECKPOINT_FILE, tmp / CHECKPOINT_FILE)
        (tmp / BUILD_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        old = final_dir.with_name(f".{final_dir.name}-old")
        if old.exists():
            shutil.rmtree(old)
        if final_dir.exists():
            final_dir.rename(old)
        tmp.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
