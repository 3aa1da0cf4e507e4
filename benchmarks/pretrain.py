"""Stacked denoising autoencoder pretraining on MNIST through edgec's own pipeline (Vincent et al. 2008 / 2010).

    python benchmarks/pretrain.py [--data ../shared/data/mnist] [--json benchmarks/results/pretrain.json]

An MLP 784-100-100-100-100-10 (four hidden ReLU layers) is trained twice per seed from the same
initial weights (the source artifact of that seed):

- ``random_init``: the train stage alone;
- ``pretrained``: the pretrain stage (each hidden layer a tied-weight denoising autoencoder, masking
  noise, trained greedily with the layers below frozen), then the same train stage;
- ``random_init_longer`` (a control): the train stage alone for ``--longer-epochs``, about the
  pretrained arm's total compute (pretraining costs roughly half a 20-epoch supervised run here).

The first two get the same supervised epochs budget, optimizer, schedule and data order; the
pretrained arm additionally spends ``--pretrain-epochs`` unsupervised epochs per hidden layer, whose
time is reported. Training keeps the best-validation epoch's weights (early stopping on the held-out
validation split); nothing is selected on the test split, which is measured once per trained model.

Reported: test accuracy of each arm (mean and sample std over the seeds, and per seed), the per-layer
gradient norms of the supervised loss at the start of training for both initialisations (the
vanishing-gradient diagnostic: random init starves the lower layers), each layer's reconstruction
loss, and the seconds. The reference write-up reports 97.3% plain against 97.7% with denoising
pretraining.

Torch uses 1 thread by default (--threads), as the other benchmarks: on a busy 2-core machine,
spinning OpenMP threads fighting other processes run far slower than one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"name": "mlp", "args": {"widths": [100, 100, 100, 100]}}
TRAIN = {"batch_size": 128, "lr": 1e-3, "optimizer": "adam", "schedule": "cosine"}
PRETRAIN = {"batch_size": 128, "lr": 1e-3, "noise": "mask", "level": 0.25}
REFERENCE = {"random_init": 0.973, "pretrained": 0.977}
ARMS = ("random_init", "pretrained", "random_init_longer")


def _shown(path: Path) -> str:
    """The data folder as recorded in the JSON: relative to the repository, never this machine's path."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def training_subset(data, n: int | None, seed: int = 0):
    """A class-balanced random subset of ``n`` training samples (validation and test untouched)."""
    if n is None or n >= len(data.y_train):
        return data
    rng = np.random.default_rng(seed)
    classes = np.unique(data.y_train)
    per_class = n // len(classes)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(data.y_train == c))[:per_class] for c in classes]))
    return dataclasses.replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx])


def run_seeds(data, seeds: list[int], train_cfg, longer_cfg, pretrain_cfg, console) -> list[dict]:
    """Both arms for each seed, from that seed's initial weights, in a fresh stage cache."""
    from edgec.base.architecture import ModelTrust
    from edgec.pipeline.cache import StageCache
    from edgec.pipeline.runner import run_chain
    from edgec.pipeline.source import make_source
    from edgec.pipeline.stage import StageContext
    from edgec.pipeline.stages.pretrain import PretrainStage
    from edgec.pipeline.stages.train import TrainStage

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-pretrain-") as tmp:
        cache = StageCache(Path(tmp) / "cache")
        for seed in seeds:
            ctx = StageContext(data=data, seed=seed, target=None, console=console)
            source = make_source(MODEL["name"], MODEL["args"], None, data, seed, cache, ModelTrust())
            (plain,) = run_chain([TrainStage(train_cfg)], source, ctx, cache)
            (longer,) = run_chain([TrainStage(longer_cfg)], source, ctx, cache)
            pre, tuned = run_chain([PretrainStage(pretrain_cfg), TrainStage(train_cfg)], source, ctx, cache)
            grads = pre.artifact.info["pretrain"]["grad_norms"]
            rows.append({
                "seed": seed,
                "random_init": {"test_accuracy": plain.artifact.info["accuracy"],
                                "val_accuracy": plain.artifact.info["val_accuracy"],
                                "best_epoch": plain.artifact.info["best_epoch"], "seconds": plain.seconds},
                "random_init_longer": {"test_accuracy": longer.artifact.info["accuracy"],
                                       "val_accuracy": longer.artifact.info["val_accuracy"],
                                       "best_epoch": longer.artifact.info["best_epoch"], "seconds": longer.seconds},
                "pretrained": {"test_accuracy": tuned.artifact.info["accuracy"],
                               "val_accuracy": tuned.artifact.info["val_accuracy"],
                               "best_epoch": tuned.artifact.info["best_epoch"],
                               "pretrain_seconds": pre.seconds, "finetune_seconds": tuned.seconds,
                               "reconstruction_loss": {l["layer"]: l["val_loss"] for l in pre.artifact.info["pretrain"]["layers"]}},
                "grad_norms": {"layers": grads["layers"], "random_init": grads["before"], "pretrained": grads["pretrained"]},
            })
    return rows


def summarise(rows: list[dict]) -> dict:
    """The headline figures: each arm's mean and std over the seeds, the mean gradient norms."""
    out = {}
    for arm in ARMS:
        per_seed = [r[arm]["test_accuracy"] for r in rows]
        mean, std = _stats(per_seed)
        seconds = sum(r[arm].get("seconds", 0) + r[arm].get("pretrain_seconds", 0) + r[arm].get("finetune_seconds", 0)
                      for r in rows)
        out[arm] = {"test_accuracy": mean, "test_accuracy_std": std, "test_accuracy_per_seed": per_seed, "seconds": seconds}
    layers = rows[0]["grad_norms"]["layers"]
    out["grad_norms"] = {"layers": layers, **{arm: [statistics.fmean(r["grad_norms"][arm][i] for r in rows)
                                                     for i in range(len(layers))] for arm in ("random_init", "pretrained")}}
    out["pretrained_better_seeds"] = sum(r["pretrained"]["test_accuracy"] > r["random_init"]["test_accuracy"] for r in rows)
    return out


def print_table(summary: dict, rows: list[dict], data, args, seconds: float, pre_seconds: float) -> None:
    arch = "-".join(map(str, [784, *MODEL["args"]["widths"], 10]))
    print(f"MNIST, MLP {arch}: {len(data.y_train):,} training / {len(data.y_val):,} validation images, test accuracy on "
          f"{len(data.y_test):,}; {args.epochs} supervised epochs for both arms (best validation epoch kept), "
          f"pretraining {args.pretrain_epochs} epochs per hidden layer; mean ± sample std over seeds {args.seeds}")
    header = f"{'arm':27} {'test accuracy':>16}   per seed"
    print(header)
    print("-" * (len(header) + 30))
    for arm in ARMS:
        s = summary[arm]
        per_seed = ", ".join(f"{100 * v:.2f}%" for v in s["test_accuracy_per_seed"])
        label = f"{arm} ({args.longer_epochs} ep)" if arm == "random_init_longer" else arm
        print(f"{label:27} {100 * s['test_accuracy']:>9.2f}% ± {100 * s['test_accuracy_std']:.2f}   {per_seed}")
    diff = summary["pretrained"]["test_accuracy"] - summary["random_init"]["test_accuracy"]
    print(f"pretrained better on {summary['pretrained_better_seeds']} of {len(rows)} seeds; difference {100 * diff:+.2f} points")
    print(f"reference write-up: random init {100 * REFERENCE['random_init']:.1f}%, denoising pretraining "
          f"{100 * REFERENCE['pretrained']:.1f}%")
    grads = summary["grad_norms"]
    print("gradient norm of each hidden layer's weights at the start of supervised training (mean over seeds):")
    print(f"{'layer':10} {'random init':>12} {'pretrained':>12}")
    for i, name in enumerate(grads["layers"]):
        print(f"{name:10} {grads['random_init'][i]:12.4f} {grads['pretrained'][i]:12.4f}")
    arms = ", ".join(f"{arm} {summary[arm]['seconds']:.0f} s" for arm in ARMS)
    print(f"total {seconds:.0f} s ({arms}; pretraining {pre_seconds:.0f} s of the pretrained arm's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist",
                        help="folder with the four MNIST IDX files (.gz or raw)")
    parser.add_argument("--json", type=Path, default=None,
                        help="result file (default benchmarks/results/pretrain.json; none with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="supervised epochs, the same for both arms")
    parser.add_argument("--pretrain-epochs", type=int, default=5, help="unsupervised epochs per hidden layer")
    parser.add_argument("--longer-epochs", type=int, default=30, help="supervised epochs of the random_init_longer control")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="class-balanced training subset (default: all 54,000 after the validation split)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="1 epoch each on 2,000 samples: checks the script")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    json_path = args.json or (None if args.quick else ROOT / "benchmarks" / "results" / "pretrain.json")
    if args.quick:
        args.epochs, args.pretrain_epochs, args.longer_epochs, args.train_samples = 1, 1, 2, 2000
    if not any((args.data / f"train-images-idx3-ubyte{ext}").is_file() for ext in (".gz", "")):
        print(f"MNIST not found in {args.data}: skipping (nothing written). Pass --data DIR, the folder holding "
              "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
              "t10k-labels-idx1-ubyte.gz", file=sys.stderr)
        raise SystemExit(0)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: waiting OpenMP threads sleep, not spin
    import torch
    from rich.console import Console

    from edgec.base.data import load_dataset
    from edgec.ondevice.machine import machine_info
    from edgec.pipeline.stages.pretrain import PretrainConfig
    from edgec.pipeline.stages.train import TrainConfig

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    start = time.perf_counter()
    data = training_subset(load_dataset(f"mnist:{args.data}"), args.train_samples)
    train_cfg = TrainConfig(**TRAIN, epochs=args.epochs, patience=args.epochs)  # all epochs run; the best-val one is kept
    longer_cfg = TrainConfig(**TRAIN, epochs=args.longer_epochs, patience=args.longer_epochs)
    pretrain_cfg = PretrainConfig(**PRETRAIN, epochs=args.pretrain_epochs)
    console = Console(stderr=True, quiet=args.quiet)
    console.print(f"data {data.summary()}; torch threads {torch.get_num_threads()}; load average {load_start}")
    rows = run_seeds(data, args.seeds, train_cfg, longer_cfg, pretrain_cfg, console)
    seconds = time.perf_counter() - start
    pre_seconds = sum(r["pretrained"]["pretrain_seconds"] for r in rows)
    summary = summarise(rows)
    print_table(summary, rows, data, args, seconds, pre_seconds)
    print(f"load average {load_start} -> {os.getloadavg()}")
    if json_path is None:
        return
    result = {
        "schema": "edgec-pretrain-benchmark", "schema_version": 1, **summary,
        "epochs": args.epochs, "pretrain_epochs_per_layer": args.pretrain_epochs, "longer_epochs": args.longer_epochs,
        "seeds": args.seeds,
        "model": {**MODEL, "architecture": "-".join(map(str, [784, *MODEL["args"]["widths"], 10]))},
        "train": train_cfg.model_dump(mode="json"), "pretrain": pretrain_cfg.model_dump(mode="json"),
        "data": f"MNIST (mnist:{_shown(args.data)}): {len(data.y_train):,} training images"
                + (" (class-balanced random subset, seed 0)" if args.train_samples else "")
                + f", {len(data.y_val):,} validation, the whole {len(data.y_test):,}-image test split",
        "rows": rows, "seconds": seconds, "pretrain_seconds": pre_seconds, "quick": args.quick,
        "machine": {**machine_info(), "arch": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_average_start": load_start,
                    "load_average_end": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "reference": "reference write-up (MNIST, MLP 784-100-100-100-100-10): random init 97.3%, denoising pretraining 97.7%",
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
