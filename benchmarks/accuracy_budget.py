"""Accuracy-budgeted builds against today's fixed recipe, model by model (issue 24).

    python benchmarks/accuracy_budget.py [--models lenet-5 cnn-small ...] [--epochs 10] [--json PATH]

For each model, three rpi (TFLite int8) bundles through the CLI, with one stage cache so all start from
the same trained model:

    budgeted        the default chain (train, distill, prune, retrain, share, export), distill.width and
                    prune.sparsity unset: the distill stage picks the narrowest student and the prune stage
                    its sparsities within their allowances of the accuracy budget
    fixed_recipe    the same chain with the old fixed settings, distill.width = 0.5 and
                    prune.sparsity = {conv = 0.5, linear = 0.8}
    uncompressed    train -> export: the int8 bundle of the trained model, the size reference

Both compressed builds run with ``budget.enforce = false`` so that a bundle over the budget is still
measured (the budget is recorded, not enforced). Figures per model: ``trained_val`` / ``trained_test``
(the trained model), ``bundle_val`` / ``bundle_test`` (the int8 bundle in its runtime), ``drop_pt``
(test accuracy lost, trained -> bundle, in points), ``val_drop_pt`` (the figure the budget judges),
``budget_pt``, ``transport_bytes``, ``uncompressed_int8_bytes`` (the uncompressed bundle's transport
bytes), ``size_ratio`` (uncompressed_int8_bytes / transport_bytes), ``seconds`` (the chain's stage
seconds; a stage the other recipe computed first counts the seconds it took there), and the same for
``fixed_recipe``. ``all_within_budget``: every budgeted bundle within ``budget_pt`` on test.

Data: the built-in digits (8x8; 1,293 train / 144 validation / 360 test) for the image models, and
scikit-learn's breast cancer (30 features, 569 samples, an 80/20 stratified split) written to an npz
for the MLP. Small epoch counts keep the run under an hour on 2 shared CPU cores (the budgeted distill
and prune searches cost up to ~3x the fixed recipe's stage seconds).
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

from edgec.ondevice.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
FIXED_SPARSITY = "prune.sparsity={conv=0.5, linear=0.8}"
FIXED_WIDTH = "distill.width=0.5"
# model -> (--data, --model); "breast-cancer" is written to an npz first
MODELS = {
    "lenet-5": ("digits", "lenet-5"),
    "cnn-small": ("digits", "cnn-small"),
    "mlp-breast-cancer": ("breast-cancer", "mlp"),
    "resnet-8 (user)": ("digits", "benchmarks.budget_models:resnet8"),
    "ds-cnn (user)": ("digits", "benchmarks.budget_models:ds_cnn"),
    "mobilenet-v2 (user)": ("digits", "benchmarks.budget_models:mobilenet_v2"),
    "mobilenet-v3 (user)": ("digits", "benchmarks.budget_models:mobilenet_v3"),
}


def breast_cancer_npz(path: Path) -> str:
    import numpy as np
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x.astype(np.float32), y, test_size=0.2, stratify=y,
                                                        random_state=0)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


def edgec(*args, env) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, (lines[-1][:400] if proc.returncode and lines else "")


def recipe(out: Path, seconds_by_key: dict[str, float]) -> dict:
    """The figures of one build folder; cached stages count the seconds they took where they ran."""
    build = json.loads((out / "rpi" / "build.json").read_text())
    budget, export = build["accuracy_budget"], build["stages"][-1]["info"]
    for s in build["stages"]:
        if not s["cached"]:
            seconds_by_key[s["key"]] = s["seconds"]
    prune = next((s["info"] for s in build["stages"] if s["kind"] == "prune"), {})
    return {
        "trained_val": budget["reference"], "trained_test": budget["reference_test"],
        "bundle_val": budget["bundle_val"], "bundle_test": budget["bundle_test"],
        "drop_pt": round(100 * (budget["reference_test"] - budget["bundle_test"]), 2),
        "val_drop_pt": budget["drop_pt"], "budget_pt": budget["budget_pt"], "val_met": budget["met"],
        "transport_bytes": export["transport_bytes"], "model_bytes": export["model_bytes"],
        "precision": export.get("precision"),
        "weights_zero": (prune.get("sparsity") or {}).get("total", {}).get("sparsity"),
        "prune_chosen": (prune.get("sensitivity") or {}).get("chosen"),
        "seconds": round(sum(s["seconds"] if not s["cached"] else seconds_by_key.get(s["key"], 0.0)
                             for s in build["stages"]), 1),
    }


def run_model(name: str, data: str, model: str, epochs: int, work: Path, env) -> dict:
    common = ["build", "--data", data, "--model", model, "--target", "rpi", "--epochs", epochs,
              "--set", "budget.enforce=false", "--json"]
    seconds_by_key: dict[str, float] = {}
    row: dict = {"model": model, "data": data.split(":")[0] if ":" in data else data}
    builds = {"budgeted": [], "fixed_recipe": ["--set", FIXED_SPARSITY, "--set", FIXED_WIDTH],
              "uncompressed": ["--stages", "train,export"]}
    for kind, extra in builds.items():
        out = work / f"{name.split()[0]}-{kind}"
        rc, error = edgec(*common, *extra, "--out", out, env=env)
        if rc != 0:
            row[kind] = {"error": error, "exit_code": rc}
            continue
        row[kind] = recipe(out, seconds_by_key)
    budgeted, fixed, dense = row.pop("budgeted"), row["fixed_recipe"], row.pop("uncompressed")
    row.update(budgeted)
    dense_bytes = dense.get("transport_bytes")
    row["uncompressed_int8_bytes"] = dense_bytes
    for figures in (row, fixed):
        if dense_bytes and figures.get("transport_bytes"):
            figures["size_ratio"] = round(dense_bytes / figures["transport_bytes"], 2)
    if "error" in dense:
        row["uncompressed_error"] = dense["error"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (the other stages keep their defaults)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy_budget.json")
    args = parser.parse_args()

    start = time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="edgec-budget-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "EDGEC_CACHE_DIR": str(work / "cache"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        for name in args.models:
            data, model = MODELS[name]
            if data == "breast-cancer":
                data = breast_cancer_npz(work / "breast_cancer.npz")
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows[name] = run_model(name, data, model, args.epochs, work, env)
            rows[name]["data"] = "breast-cancer (scikit-learn, npz)" if model == "mlp" else rows[name]["data"]

    _print(rows)
    shipped = [r for r in rows.values() if "error" not in r]
    within = [r["drop_pt"] <= r["budget_pt"] for r in shipped]
    ratios = [r["size_ratio"] for r in shipped if r.get("size_ratio")]
    slower = [r["seconds"] / r["fixed_recipe"]["seconds"] for r in shipped if r["fixed_recipe"].get("seconds")]
    seconds = time.perf_counter() - start
    summary = {
        "all_within_budget": len(shipped) == len(rows) and all(within),
        "within_budget": sum(within), "models_run": len(rows),
        "mean_size_ratio": round(sum(ratios) / len(ratios), 2) if ratios else None,
        "max_seconds_vs_fixed": round(max(slower), 2) if slower else None,
    }
    print(json.dumps(summary))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "schema": "edgec-accuracy-budget-benchmark", "schema_version": 1, "machine": machine_info(),
        "load_average": os.getloadavg(), "epochs": args.epochs, **summary, "models": rows,
        "seconds": round(seconds, 1),
    }, indent=2) + "\n")


def _print(rows: dict) -> None:
    header = (f"{'model':22} {'trained test':>12} {'bundle test':>11} {'drop pt':>8} {'zero':>6} {'transport':>10} "
              f"{'ratio':>6} {'s':>6} | {'fixed: test':>11} {'drop':>6} {'transport':>10} {'s':>6}")
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        f = r["fixed_recipe"]
        if "error" in r:
            print(f"{name:22} budgeted build failed: {r['error']}")
            continue
        fixed = (f"{f['bundle_test']:11.4f} {f['drop_pt']:6.2f} {f['transport_bytes']:10,} {f['seconds']:6.1f}"
                 if "error" not in f else f"failed: {f['error'][:60]}")
        print(f"{name:22} {r['trained_test']:12.4f} {r['bundle_test']:11.4f} {r['drop_pt']:8.2f} "
              f"{(r['weights_zero'] or 0):6.0%} {r['transport_bytes']:10,} {r.get('size_ratio') or 0:6.2f} "
              f"{r['seconds']:6.1f} | {fixed}")


if __name__ == "__main__":
    main()
