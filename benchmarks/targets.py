"""The bundle of every target, from the built-in digits and from MNIST: accuracy, agreement, sizes.

    python benchmarks/targets.py [--data ../shared/data/mnist] [--json benchmarks/results/targets.json]

digits: the quick start's default pipeline (train, prune, retrain, share, distill, export; cnn-small).
MNIST: LeNet-5 trained 3 epochs then exported (the compressed MNIST builds are in
benchmarks/deep_compression.py). Every bundle is then checked with `edgec verify`. Prints a table and
writes JSON.
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
VARIANTS = [("rpi", ()), ("mobile", ()), ("mobile", ("--precision", "fp16")), ("desktop-gpu", ())]


def edgec(*args, env) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"edgec {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "targets.json")
    args = parser.parse_args()
    datasets = [("digits", "digits", ())]
    if (args.data / "train-images-idx3-ubyte.gz").is_file() or (args.data / "train-images-idx3-ubyte").is_file():
        datasets.append(("mnist", f"mnist:{args.data}", ("--model", "lenet-5", "--stages", "train,export", "--epochs", "3")))
    else:
        print(f"MNIST not found in {args.data}: digits only", file=sys.stderr)

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-targets-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "EDGEC_CACHE_DIR": str(work / "cache")}
        for name, data, extra in datasets:
            for target, variant in VARIANTS:
                out = work / f"{name}-{target}{''.join(variant)}"
                start = time.perf_counter()
                summary = json.loads(edgec("build", "--data", data, "--target", target, *extra, *variant,
                                           "--out", out, "--json", env=env).stdout)
                seconds = time.perf_counter() - start
                bundle = out / target / "bundle"
                verified = json.loads(edgec("verify", bundle, "--json", "-", env=env).stdout)["ok"]
                m = json.loads((bundle / "manifest.json").read_text())
                rows.append({
                    "data": name, "model": summary["config"]["model"]["name"], "target": target,
                    "precision": m["precision"], "file": m["model_file"],
                    "reference_accuracy": m["metrics"]["reference_accuracy"], "accuracy": m["metrics"]["accuracy"],
                    "top1_agreement": m["metrics"]["top1_agreement"], "max_abs_diff": m["metrics"]["max_abs_diff"],
                    "reference_fp32_bytes": m["size"]["reference_fp32_bytes"], "model_bytes": m["size"]["model_bytes"],
                    "transport_bytes": m["size"]["transport_bytes"], "verified": verified,
                    "build_seconds": round(seconds, 1), "stages_ran": sum(not s["cached"] for s in summary["stages"]),
                })
                print(f"{name} {target} {m['precision']} done", file=sys.stderr, flush=True)

    cols = ["data", "model", "target", "precision", "reference_accuracy", "accuracy", "top1_agreement",
            "reference_fp32_bytes", "model_bytes", "transport_bytes", "verified", "build_seconds"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) and c != "build_seconds" else str(r[c]) for c in cols) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"schema": "edgec-targets-benchmark", "schema_version": 1, "machine": machine_info(),
                                     "load_average": os.getloadavg(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
