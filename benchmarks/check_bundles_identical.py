"""Build example configs with an old revision and with the working tree; compare the bundles' bytes.

    .venv/bin/python benchmarks/check_bundles_identical.py --old REV [--work DIR] [--side old|new|both]
                                                           [--config NAME ...] [--mnist DIR] [--list]

A refactoring that claims "behaviour unchanged" must leave every bundle byte-identical: the model
file, the transport payload, the test vectors and eval sets, the runner copy, and the manifest apart
from what names the code or the time (the lineage's cache keys hash the code, ``versions`` the
installed packages). Each side runs from its own copy of the sources (``git archive REV`` for the old
one, the working tree for the new one) laid out as the installed ``edgec`` package, with its own fresh
``EDGEC_CACHE_DIR``, so nothing one side trained is reused by the other. A build with no bundle on
either side (e.g. one that stops at the accuracy budget) counts as unchanged when both end with the
same exit code and error line. ``--side old`` / ``new``
builds one side only (the sides can be built at different times), ``--side none`` compares what
was built. Exit 1 when any compared bundle differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import io
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name -> edgec build arguments: every examples/*.toml that builds a bundle, plus the quick start on
# each target. "{mnist}" is replaced by --mnist DIR's ``mnist:DIR`` (default ``mnist``: the folder
# `edgec data fetch mnist` fills). The digits ones build in minutes on a laptop CPU; the MNIST ones
# train for longer (lenet-300-100 and distill the longest). examples/regression.toml stops at the
# accuracy budget (exit 1, nothing published) on a9d4279: it has no bundle to compare there.
CONFIGS = {
    "quick-start": ["--target", "rpi"],
    "quick-start-onnx-int8": ["--target", "desktop-gpu", "--precision", "int8"],
    "add-a-task": ["--config", "examples/add-a-task.toml", "--target", "rpi"],
    "qat-pruned-shared": ["--config", "examples/qat-pruned-shared.toml", "--target", "rpi"],
    "regression": ["--config", "examples/regression.toml", "--target", "rpi"],
    "quick-start-onnx-fp16": ["--target", "desktop-gpu"],
    "stage-instances": ["--config", "examples/stage-instances.toml", "--target", "rpi"],
    "anomaly-autoencoder": ["--config", "examples/anomaly-autoencoder.toml", "--target", "rpi"],
    "grow-new-classes": ["--config", "examples/grow-new-classes.toml", "--target", "rpi"],
    "structured-resnet8": ["--config", "examples/structured-resnet8.toml", "--data", "{mnist}", "--target", "rpi"],
    "mnist-lenet-5": ["--config", "examples/mnist-lenet-5.toml", "--data", "{mnist}", "--target", "rpi"],
    "mnist-lenet-300-100": ["--config", "examples/mnist-lenet-300-100.toml", "--data", "{mnist}", "--target", "rpi"],
    "mnist-distill": ["--config", "examples/mnist-distill.toml", "--data", "{mnist}", "--target", "rpi"],
}
# Examples with no bundle to compare here, and why (printed by --list).
NOT_BUILT = {
    "search-lenet-300-100": "an `edgec search` config (12 MNIST trials), not a build; its trials build bundles "
                            "the same way as mnist-lenet-300-100",
    "structured-mobilenet-v1": "needs an image folder (--data folder:DIR, visual wake words); none ships here",
    "latency-resnet18": "its channel widths follow latency measured while it builds (NetAdapt's table), so two "
                        "builds on a busy host may rightly choose differently; its stages before the prune are "
                        "compared through the other examples",
}
PACKAGE_DIRS = {"pipeline": "pipeline", "targets": "targets", "calibration": "calibration"}  # as pyproject maps them
VOLATILE_MANIFEST_KEYS = ("lineage", "versions", "edgec_version", "self_sha256")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="HEAD", help="the old revision (default: HEAD, i.e. the working tree against the last commit)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgec-bundles-identical"))
    parser.add_argument("--side", choices=("old", "new", "both", "none"), default="both",
                        help="which side to build before comparing (none: compare what was built)")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), help="default: every config")
    parser.add_argument("--mnist", type=Path, help="MNIST folder for the MNIST examples (default: edgec's own)")
    parser.add_argument("--list", action="store_true", help="list the configs and the examples left out, then exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join([f"{n}: {' '.join(a)}" for n, a in CONFIGS.items()]
                        + [f"{n}: not built ({why})" for n, why in NOT_BUILT.items()]))
        return 0
    data = f"mnist:{args.mnist.resolve()}" if args.mnist else "mnist"
    names = args.config or list(CONFIGS)
    sides = {"both": ("old", "new"), "none": ()}.get(args.side, (args.side,))
    for side in sides:
        package = _package(side, args.old, args.work)
        for name in names:
            _build(side, package, name, args.work, [a.replace("{mnist}", data) for a in CONFIGS[name]])
    return _compare(names, args.work)


def _package(side: str, old_rev: str, work: Path) -> Path:
    """A folder holding ``edgec/`` as installed (pipeline/, targets/, calibration/ inside it)."""
    src = work / side / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    if side == "old":
        archive = subprocess.check_output(["git", "-C", str(REPO), "archive", "--format=tar", old_rev])
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(src, filter="data")
    else:
        for name in ("edgec", "examples", *PACKAGE_DIRS.values()):
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    package = work / side / "package"
    shutil.rmtree(package, ignore_errors=True)
    shutil.rmtree(work / side / "cache", ignore_errors=True)  # a fresh cache: nothing the other side trained
    shutil.copytree(src / "edgec", package / "edgec")
    for sub, folder in PACKAGE_DIRS.items():
        shutil.copytree(src / folder, package / "edgec" / sub)
    return package


def _build(side: str, package: Path, name: str, work: Path, build_args: list[str]) -> None:
    out = work / side / "out" / name
    shutil.rmtree(out, ignore_errors=True)
    cache = work / side / "cache"  # one per side, emptied when the side's sources are laid out
    env = {**os.environ, "PYTHONPATH": str(package), "EDGEC_CACHE_DIR": str(cache)}
    src = work / side / "src"
    # -P: the build runs in src/ (for the examples' relative paths), whose edgec/ lacks pipeline/ and
    # targets/; on sys.path it would shadow the laid-out package, and the worktree's editable install
    # would then supply edgec.pipeline: the old side would run the new pipeline.
    command = [sys.executable, "-P", "-m", "edgec", "build", *build_args, "--out", str(out)]
    start = time.monotonic()
    proc = subprocess.run(command, cwd=src, env=env, capture_output=True, text=True)
    print(f"{side} {name}: exit {proc.returncode} in {time.monotonic() - start:.0f} s", flush=True)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    (work / side / "out" / f"{name}.outcome").write_text(f"exit {proc.returncode}" + (f": {last}" if proc.returncode else ""))
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)


def _bundle(work: Path, side: str, name: str) -> Path | None:
    found = sorted((work / side / "out" / name).glob("*/bundle/manifest.json"))
    return found[0].parent if found else None


def _compare(names: list[str], work: Path) -> int:
    failed = False
    for name in names:
        old, new = _bundle(work, "old", name), _bundle(work, "new", name)
        if old is None or new is None:
            outcomes = [_outcome(work, side, name) for side in ("old", "new")]
            same = old is None and new is None and outcomes[0] is not None and outcomes[0] == outcomes[1]
            failed |= not same and None not in outcomes
            print(f"{name}: no bundle on either side, the same outcome ({outcomes[0]})" if same else
                  f"{name}: not compared (bundle missing: {'old' if old is None else 'new'}; outcomes {outcomes})")
            continue
        differences = _differences(old, new)
        failed |= bool(differences)
        print(f"{name}: {'byte-identical' if not differences else 'DIFFERS: ' + ', '.join(differences)}")
    return 1 if failed else 0


def _outcome(work: Path, side: str, name: str) -> str | None:
    """How the side's build ended (exit code and, on failure, its error line), when it was recorded."""
    path = work / side / "out" / f"{name}.outcome"
    return path.read_text() if path.exists() else None


def _differences(old: Path, new: Path) -> list[str]:
    files = lambda root: {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    old_files, new_files = files(old), files(new)
    found = [f"only in old: {n}" for n in sorted(old_files - new_files)]
    found += [f"only in new: {n}" for n in sorted(new_files - old_files)]
    for n in sorted(old_files & new_files):
        if n == "manifest.json":
            a, b = (_stable_manifest(root / n) for root in (old, new))
            if a != b:
                found.append(f"manifest.json ({', '.join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))})")
        elif _sha256(old / n) != _sha256(new / n):
            found.append(n)
    return found


def _stable_manifest(path: Path) -> dict:
    manifest = json.loads(path.read_text())
    for key in VOLATILE_MANIFEST_KEYS:
        manifest.pop(key, None)
    return manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
