"""Beyond classification (issue 17): an anomaly-detection autoencoder and a regression, through the
whole compression chain, to verified and benched bundles.

    python benchmarks/beyond_classification.py [--data ../shared/data/mnist] [--normal 0]
                                               [--json benchmarks/results/beyond_classification.json]

1. Anomaly: MNIST, digit ``--normal`` (0) is the normal class: the dense MLPerf Tiny autoencoder
   (784-128-128-128-128-8-128-128-128-128-784) trains on the training images of that digit only; the
   whole test split (10,000 images) is scored by reconstruction error, the other nine digits marked
   anomalous. Figure: ROC AUC.
2. Regression: scikit-learn's diabetes data (shipped with scikit-learn, no download: 442 patients,
   10 features in their own units, disease progression one year later; 353 train / 89 test), an MLP
   64-32-1. Figure: R^2 in real units.

Each runs the full chain: train -> distill (half-width student) -> prune (iterative) -> retrain ->
share -> export, for rpi (int8 TFLite, the target figures) and then mobile and desktop-gpu (their
exports reuse the cached chain). Every bundle is checked with ``edgec verify`` and timed with
``edgec bench`` (batch 1, the best runtime setting of this machine).

``auc_fp32`` / ``r2_fp32``: the fp32 model the train stage produced (uncompressed), on the whole test
split; ``*_bundle``: the rpi int8 bundle in its runtime on the same split. Targets: AUC within 0.01 and
R^2 within 0.02 of the fp32 model. ``fp32_bytes``: 4 x the parameters of that fp32 model;
``transport_bytes``: what the device downloads. ``p50_ms``: the rpi bundle's median latency here.

Prints a table and writes JSON.
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
TARGETS = ("rpi", "mobile", "desktop-gpu")
AUC_TARGET, R2_TARGET = 0.01, 0.02


def anomaly_config(data: Path, normal: int) -> dict:
    return {
        "task": "reconstruction",
        "data": {"source": f"mnist:{data}", "normal": [normal]},
        "model": {"name": "autoencoder"},  # MLPerf Tiny: 128 x 4, bottleneck 8, 128 x 4
        "stages": [
            {"kind": "train", "epochs": 40, "patience": 8},
            {"kind": "distill", "epochs": 40, "lr": 1e-3, "patience": 8},
            {"kind": "prune", "sparsity": {"linear": 0.8}},
            {"kind": "retrain", "epochs": 10},
            {"kind": "share", "epochs": 3},
            {"kind": "export"},
        ],
    }


def regression_config() -> dict:
    return {
        "task": "regression",
        "data": {"source": "diabetes"},
        "model": {"name": "mlp", "args": {"widths": [64, 32]}},
        "stages": [
            {"kind": "train", "epochs": 100, "lr": 3e-4, "patience": 20},
            {"kind": "distill", "lr": 1e-3},
            {"kind": "prune", "sparsity": 0.7},
            {"kind": "retrain", "epochs": 30, "patience": 30},  # 15 epochs left seed 0 at a gap of 0.018
            {"kind": "share"},
            {"kind": "export"},
        ],
    }


def edgec(*args, env) -> str:
    proc = subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"edgec {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_task(name: str, config: dict, work: Path, env: dict) -> dict:
    from edgec.api import build

    figure = "auc" if config["task"] == "reconstruction" else "r2"
    rows = {}
    fp32 = None
    for target in TARGETS:
        print(f"{name}: build {target} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = build(config, target=target, out=work / name, cache_dir=work / "cache")
        seconds = time.perf_counter() - start
        bundle = result.bundle
        manifest = json.loads((bundle / "manifest.json").read_text())
        verify = json.loads(edgec("verify", bundle, "--json", "-", env=env))
        bench_file = work / f"{name}-{target}-bench.json"
        edgec("bench", bundle, "--runs", 300, "--min-seconds", 1, "--batch-sizes", "1", "--json", bench_file,
              "--no-write-recommended", env=env)
        bench = json.loads(bench_file.read_text())
        m = manifest["metrics"]
        stages = {s.id: s.info for s in result.stages}
        fp32 = stages["train"]
        rows[target] = {
            "precision": manifest["precision"],
            f"{figure}_bundle": m[figure],
            f"{figure}_reference": m[f"reference_{figure}"],  # the compressed fp32 model that was exported
            "relative_error": m["relative_error"],
            "verify_ok": verify["ok"],
            f"verify_eval_{figure}": verify["quality"]["value"],
            f"bench_eval_{figure}": (bench.get("quality") or {}).get("value"),
            "eval_samples": verify["quality"]["eval_samples"],
            "model_bytes": manifest["size"]["model_bytes"],
            "transport_bytes": manifest["size"]["transport_bytes"],
            "p50_ms": bench["latency_ms"]["p50"],
            "p95_ms": bench["latency_ms"]["p95"],
            "best_setting": bench["best"]["id"],
            "runtime": f"{bench['runtime']['package']} {bench['runtime']['version']}",
            "build_seconds": round(seconds, 1),
            "stages_run": result.stages_run,
        }
        if target == "rpi":
            chain = [{"stage": s.id, figure: s.info.get(figure), "params": s.info.get("params"),
                      "nonzero_params": s.info.get("nonzero_params")} for s in result.stages]
            extra = {k: m.get(k) for k in ("mse", "reference_mse", "mae", "rmse", "reference_mae", "reference_rmse",
                                           "anomalous_test_samples", "test_samples") if k in m}
            widened = manifest["conversion"].get("output_range_widened")
    rpi = rows["rpi"]
    out = {
        "data": config["data"]["source"],
        f"{figure}_fp32": fp32[figure],
        f"{figure}_bundle": rpi[f"{figure}_bundle"],
        "fp32_bytes": fp32["fp32_bytes"],
        "transport_bytes": rpi["transport_bytes"],
        "p50_ms": rpi["p50_ms"],
        "model": config["model"],
        "chain": chain,
        "test": extra,
        "targets": rows,
    }
    if widened:
        out["int8_output_range"] = widened
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--normal", type=int, default=0, help="the MNIST digit that is normal (default 0)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "beyond_classification.json")
    parser.add_argument("--only", choices=("anomaly", "regression"), help="run one of the two")
    args = parser.parse_args()
    if not (args.data / "train-images-idx3-ubyte.gz").is_file() and not (args.data / "train-images-idx3-ubyte").is_file():
        raise SystemExit(f"MNIST not found in {args.data}: pass --data DIR with the four IDX files")

    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgec-beyond-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "EDGEC_CACHE_DIR": str(work / "cache")}
        if args.only in (None, "anomaly"):
            results["anomaly"] = run_task("anomaly", anomaly_config(args.data.resolve(), args.normal), work, env)
            results["anomaly"]["data"] = (f"MNIST (mnist:{os.path.relpath(Path(args.data).resolve(), ROOT)}): digit {args.normal} normal (train on its images); "
                                          f"test split with digits {', '.join(str(d) for d in range(10) if d != args.normal)} "
                                          "marked anomalous")
        if args.only in (None, "regression"):
            results["regression"] = run_task("regression", regression_config(), work, env)
            results["regression"]["data"] = "diabetes (scikit-learn, shipped offline): 10 features, disease progression"

    print(f"{'task':11} {'target':12} {'precision':9} {'figure':7} {'fp32':>7} {'reference':>9} {'bundle':>7} "
          f"{'verify':>7} {'fp32 B':>9} {'transport B':>11} {'p50 ms':>8}")
    verdicts = {}
    for task, res in results.items():
        figure = "auc" if task == "anomaly" else "r2"
        for target, row in res["targets"].items():
            print(f"{task:11} {target:12} {row['precision']:9} {figure:7} {res[figure + '_fp32']:7.4f} "
                  f"{row[figure + '_reference']:9.4f} {row[figure + '_bundle']:7.4f} {row['verify_eval_' + figure]:7.4f} "
                  f"{res['fp32_bytes']:9,} {row['transport_bytes']:11,} {row['p50_ms']:8.4f}")
        limit = AUC_TARGET if task == "anomaly" else R2_TARGET
        gap = res[f"{figure}_fp32"] - res[f"{figure}_bundle"]
        verdicts[task] = {"gap": gap, "limit": limit, "pass": gap <= limit,
                          "verified_every_target": all(r["verify_ok"] for r in res["targets"].values())}
        print(f"{task}: rpi int8 bundle {figure} {res[figure + '_bundle']:.4f} vs fp32 {res[figure + '_fp32']:.4f}: "
              f"{'PASS' if gap <= limit else 'FAIL'} (within {limit} asked; gap {gap:+.4f})")
    seconds = time.perf_counter() - start
    print(f"total {seconds:.0f} s")
    payload = {**results, "schema": "edgec-beyond-classification-benchmark", "schema_version": 1,
               "machine": machine_info(), "load_average": os.getloadavg(),
               "verdicts": verdicts, "seconds": round(seconds, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
