"""The cases of issue 24's "Why" section, one by one through the real CLI (the accuracy budget's acceptance run).

    python benchmarks/why_cases.py [--cases quick-start ...] [--json PATH]

Each case is an ``edgec build`` as a new user would run it, with the default accuracy budget (1.0 point,
enforced). A case passes when the bundle ships within the budget (exit 0, ``accuracy_budget.met``) or
the build exits 1 with the one line ``error: accuracy budget not met: ...`` (nothing published).

    quick-start        edgec build --target rpi (built-in digits, the default model and chain)
    user-cnn-npz       a user's small CNN (benchmarks.budget_models:small_cnn) on their own npz (the
                       digits, 16x16, written by this script), the default chain
    stage-instances    examples/stage-instances.toml (explicit sparsities 0.5 and 0.8) on the built-in digits
    user-resnet-16     a user ResNet-8 (BatchNorm, residual, global pooling) on 16x16 digits
    ds-cnn-32          DS-CNN user factory on 32x32x3 digits, 8 training epochs, retrain.epochs = 2
    mobilenet-v2-32    MobileNetV2-style user factory, same data and epochs

Per case: ``exit_code``, ``passed``, the trained and bundle validation / test figures from build.json
(exit 0) or the refusal line (exit 1), the chain's stage seconds (stages taken from the cache, listed
in ``cached_stages``, count 0), and what the budgeted stages chose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgec.ondevice.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
FACTORIES = "benchmarks.budget_models"
EPOCHS_32 = ["--epochs", "8", "--set", "retrain.epochs=2"]
CASES = {
    "quick-start": [],
    "user-cnn-npz": ["--data", "npz:{work}/digits16.npz", "--model", f"{FACTORIES}:small_cnn"],
    "stage-instances": ["--config", str(ROOT / "examples" / "stage-instances.toml")],
    "user-resnet-16": ["--data", "npz:{work}/digits16.npz", "--model", f"{FACTORIES}:resnet8"],
    "ds-cnn-32": ["--data", "npz:{work}/digits32rgb.npz", "--model", f"{FACTORIES}:ds_cnn", *EPOCHS_32],
    "mobilenet-v2-32": ["--data", "npz:{work}/digits32rgb.npz", "--model", f"{FACTORIES}:mobilenet_v2", *EPOCHS_32],
}
REFUSAL = "error: accuracy budget not met:"


def write_digits(work: Path) -> None:
    """The built-in digits (train + validation as the npz's train split, the same test split) upsampled
    bilinearly to 16x16 (grey) and 32x32x3 (grey repeated), as float32 in [0, 1]."""
    import torch
    import torch.nn.functional as F

    from edgec.base.data import load_dataset

    data = load_dataset("digits")
    x_train = np.concatenate([data.x_train, data.x_val])
    y_train = np.concatenate([data.y_train, data.y_val])
    for name, size, channels in (("digits16", 16, 1), ("digits32rgb", 32, 3)):
        def scaled(raw):
            x = F.interpolate(torch.from_numpy(data.to_input(raw)), size=(size, size), mode="bilinear",
                              align_corners=False)
            return x.repeat(1, channels, 1, 1).numpy().astype(np.float32)

        np.savez(work / f"{name}.npz", x_train=scaled(x_train), y_train=y_train, x_test=scaled(data.x_test),
                 y_test=data.y_test)


def run_case(name: str, work: Path, env) -> dict:
    out = work / name
    args = [a.format(work=work) for a in CASES[name]]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgec", "build", "--target", "rpi", *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=work)
    shown = " ".join(args).replace(str(work), "WORK").replace(str(ROOT) + "/", "")
    row = {"command": f"edgec build --target rpi {shown}",
           "exit_code": proc.returncode, "wall_seconds": round(time.perf_counter() - start, 1)}
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode != 0:
        row["line"] = lines[-1] if lines else ""
        row["passed"] = proc.returncode == 1 and row["line"].startswith(REFUSAL) and "Traceback" not in proc.stderr
        return row
    build = json.loads((out / "rpi" / "build.json").read_text())
    budget, export = build["accuracy_budget"], build["stages"][-1]["info"]
    row.update({
        "trained_val": budget["reference"], "trained_test": budget["reference_test"],
        "bundle_val": budget["bundle_val"], "bundle_test": budget["bundle_test"],
        "val_drop_pt": budget["drop_pt"],
        "test_drop_pt": round(100 * (budget["reference_test"] - budget["bundle_test"]), 2),
        "budget_pt": budget["budget_pt"], "met": budget["met"], "precision": export.get("precision"),
        "float_ops": (export.get("mixed_precision") or {}).get("float_ops"),
        "transport_bytes": export.get("transport_bytes"),
        "stage_seconds": round(sum(s["seconds"] for s in build["stages"]), 1),
        "cached_stages": [s["stage"] for s in build["stages"] if s["cached"]],  # their seconds count 0 here
        "after_stage": {s["stage"]: s["val"] for s in budget["stages"]},
        "chosen": _chosen(build["stages"]),
    })
    row["passed"] = bool(budget["met"])
    return row


def _chosen(stages: list[dict]) -> dict:
    """What each budgeted stage chose (distill width, prune sparsities / channel ratio, share bits)."""
    chosen = {}
    for s in stages:
        info = s["info"]
        for key in ("width_search", "sensitivity", "ratio_search", "bit_search"):
            if key in info:
                chosen[s["stage"]] = info[key].get("chosen")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "why_cases.json")
    parser.add_argument("--work", type=Path, help="keep the data, the stage cache and the outputs here (default: a "
                        "temporary folder); a rerun with the same folder reuses the cached stages")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = json.loads(args.json.read_text())["cases"] if args.json.is_file() else {}  # a partial rerun keeps the rest
    with tempfile.TemporaryDirectory(prefix="edgec-why-") as tmp:
        work = Path(tmp) if args.work is None else args.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "EDGEC_CACHE_DIR": str(work / "cache"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        write_digits(work)
        for name in args.cases:
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows[name] = run_case(name, work, env)
            print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
    summary = {"all_passed": all(r["passed"] for r in rows.values()), "cases_run": len(rows)}
    print(json.dumps(summary))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "schema": "edgec-why-cases", "schema_version": 1, "machine": machine_info(), "load_average": os.getloadavg(),
        **summary, "cases": {name: rows[name] for name in CASES if name in rows},
        "seconds": round(time.perf_counter() - start, 1)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
