"""Net2Net on MNIST through edgec's grow stage (Chen, Goodfellow, Shlens, ICLR 2016).

    python benchmarks/net2net.py [--data ../shared/data/mnist] [--json benchmarks/results/net2net.json]

A small teacher (MLP 784-150-10) is trained to convergence with the train stage (seed 0), with random
shifts (2 px) and rotations (10 degrees) as teacher and students all are: without them an MLP overfits
MNIST and every model, small or grown, ends at the same ~97.8% (measured: ``--no-augment``), so
there is no capacity for growing to add. Two
students are grown from it with the grow stage: **wider** (the hidden layer 150 -> 300 units,
Net2WiderNet) and **deeper** (an identity layer after the hidden layer's ReLU: 784-150-150-10,
Net2DeeperNet). Each student is then trained for the same number of epochs with the same optimizer
and data order from three starts:

* ``net2net``: the grown model (function-preserving; symmetry broken by zero-sum noise);
* ``random_pad``: the teacher's units kept, the new units / the inserted layer freshly initialised
  (the Keras mnist_net2net example's "random-pad");
* ``random_init``: the student architecture initialised from scratch.

Curves are validation accuracy (the 6,000 held-out training images) after every epoch, epoch 0 being
the start; figures are means over the seeds. Final accuracy is reported on the validation and on the
test split (10,000 images); nothing here is chosen by test accuracy. Targets:

* ``max_abs_diff`` (teacher vs grown logits, whole test split, eval mode) <= 1e-4;
* ``epochs_to_teacher_accuracy.net2net == 0`` (the grown model starts at the teacher's accuracy);
* ``epochs_to_random_init_final.net2net <= epochs / 3`` (null if never reached);
* ``final_accuracy.net2net >= final_accuracy.random_init``.

Anchor, the Keras example (validation loss after 3 epochs): Net2Wider .030 vs random-pad .032;
Net2Deeper .029 vs random-init .041. Torch uses 1 thread (--threads): on a busy 2-core machine more
threads ran slower.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from edgec.ondevice.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4

TEACHER = {"name": "mlp", "args": {"widths": [150]}}
AUGMENT = {"enabled": True, "max_shift": 2.0, "max_rotation": 10.0}
TEACHER_TRAIN = {"epochs": 40, "batch_size": 128, "lr": 1e-3, "patience": 8, "augment": AUGMENT}
GROW = {"wider": {"wider": {"hidden.0": 300}}, "deeper": {"deeper": ["hidden.0"]}}
NOISE = 0.05  # the grow stage's default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist",
                        help="folder with the four MNIST IDX files (.gz or raw)")
    parser.add_argument("--json", type=Path, default=None,
                        help="result file (default benchmarks/results/net2net.json; none with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    parser.add_argument("--epochs", type=int, default=12, help="student training epochs")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--lr", type=float, default=1e-3, help="students' learning rate (cosine schedule)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-augment", action="store_true",
                        help="train teacher and students without random shifts/rotations (then all of them overfit "
                             "to about the same accuracy and growing has nothing to add)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="1 epoch each, one seed: checks the script only")
    parser.add_argument("--only", choices=["wider", "deeper"], default=None, help="run one experiment")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args()
    json_path = args.json or (None if args.quick else ROOT / "benchmarks" / "results" / "net2net.json")
    if args.quick:
        args.epochs, args.seeds = 1, args.seeds[:1]
    if not args.data.is_dir():
        raise SystemExit(f"MNIST not found: {args.data} is not a directory. Pass --data DIR, the folder holding "
                         "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                         "t10k-labels-idx1-ubyte.gz")

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from rich.console import Console

    from edgec.base.architecture import ModelTrust
    from edgec.base.data import load_dataset
    from edgec.pipeline.algorithms import net2net
    from edgec.pipeline.cache import StageCache
    from edgec.pipeline.runner import run_chain
    from edgec.pipeline.source import make_source
    from edgec.pipeline.stage import StageContext
    from edgec.pipeline.stages.grow import GrowConfig, GrowStage
    from edgec.pipeline.stages.train import TrainConfig, TrainStage
    from edgec.pipeline.inference import accuracy
    from edgec.pipeline.training import AugmentConfig, augment, seed_everything

    torch.set_num_threads(args.threads)
    console = Console(stderr=True, quiet=args.quiet)
    load_start = os.getloadavg()
    start = time.perf_counter()
    data = load_dataset(f"mnist:{args.data}")
    console.print(f"data {data.summary()}; torch threads {torch.get_num_threads()}; load average {load_start}")
    x_train = torch.from_numpy(data.to_input(data.x_train))
    y_train = torch.from_numpy(data.y_train)
    example = x_train[:2]
    augment_cfg = AugmentConfig(**{**AUGMENT, "enabled": not args.no_augment})

    def train_curve(model, seed: int, label: str) -> dict:
        """Train ``model`` for args.epochs; validation accuracy before training and after every epoch."""
        gen = seed_everything(seed)
        model.train()
        params = list(model.parameters())
        opt = (torch.optim.Adam(params, lr=args.lr) if args.optimizer == "adam"
               else torch.optim.SGD(params, lr=args.lr, momentum=0.9))
        steps = math.ceil(len(x_train) / args.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps)
        curve = [accuracy(model, data.x_val, data.y_val, data)]
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(order), args.batch_size):
                idx = order[i : i + args.batch_size]
                xb = augment(x_train[idx], augment_cfg, gen) if augment_cfg.enabled else x_train[idx]
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(xb), y_train[idx]).backward()
                opt.step()
                sched.step()
            curve.append(accuracy(model, data.x_val, data.y_val, data))
            console.print(f"  {label} epoch {epoch + 1}: val {curve[-1]:.4f}")
        return {"val_curve": curve, "test_accuracy": accuracy(model, data.x_test, data.y_test, data)}

    def reinitialised(model, seed: int):
        """The same architecture, every parameter drawn afresh (torch's default initialisation)."""
        fresh = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in fresh.modules():
                if hasattr(m, "reset_parameters") and m is not fresh:
                    m.reset_parameters()
        return fresh

    results = {}
    with tempfile.TemporaryDirectory(prefix="edgec-net2net-") as tmp:
        cache = StageCache(Path(tmp) / "cache")
        ctx0 = StageContext(data=data, seed=0, target=None, console=console)
        source = make_source(TEACHER["name"], TEACHER["args"], None, data, 0, cache, ModelTrust())
        teacher_cfg = dict(TEACHER_TRAIN, epochs=1 if args.quick else TEACHER_TRAIN["epochs"],
                           augment=augment_cfg.model_dump())
        (teacher_step,) = run_chain([TrainStage(TrainConfig(**teacher_cfg))], source, ctx0, cache)
        teacher = teacher_step.artifact.checkpoint().build(ModelTrust())
        teacher_val = accuracy(teacher, data.x_val, data.y_val, data)
        teacher_test = teacher_step.artifact.info["accuracy"]
        console.print(f"teacher: val {teacher_val:.4f}, test {teacher_test:.4f}, "
                      f"{teacher_step.artifact.info['epochs_run']} epochs")

        for name, grow_keys in GROW.items():
            if args.only and name != args.only:
                continue
            runs = {"net2net": [], "random_pad": [], "random_init": []}
            diffs, student_desc = [], None
            for seed in args.seeds:
                ctx = StageContext(data=data, seed=seed, target=None, console=console)
                (grow_step,) = run_chain([GrowStage(GrowConfig(**grow_keys, noise=NOISE))], teacher_step.artifact,
                                         ctx, cache)
                info = grow_step.artifact.info
                diffs.append(info["function_preserved"]["max_abs_diff"])
                student = grow_step.artifact.checkpoint().build(ModelTrust())
                student_desc = student_desc or _describe(student)
                gen = torch.Generator().manual_seed(10_000 + seed)
                if name == "wider":
                    pad = net2net.widen(teacher, "hidden.0", 300, example=example, generator=gen, init="random")
                else:
                    pad = net2net.deepen(teacher, "hidden.0", example=example, generator=gen, init="random")
                starts = {"net2net": student, "random_pad": pad, "random_init": reinitialised(student, 20_000 + seed)}
                for start_name, model in starts.items():
                    console.print(f"{name} / {start_name} / seed {seed}")
                    runs[start_name].append(train_curve(model, seed, f"{name}/{start_name}/{seed}"))
            results[name] = _summarise(runs, args.epochs, teacher_val, teacher_test, max(diffs), args.seeds,
                                       _describe(teacher), student_desc)
            results[name]["max_abs_diff_per_seed"] = diffs
    seconds = time.perf_counter() - start

    _print_table(results, args)
    print(f"total {seconds:.0f} s; load average {load_start} -> {os.getloadavg()}")
    if json_path is None:
        return
    out = {
        "schema": "edgec-net2net-benchmark", "schema_version": 1,
        **results,
        "setup": {
            "data": data.summary(), "teacher_train": teacher_cfg, "teacher_epochs_run": teacher_step.artifact.info["epochs_run"],
            "student_training": {"optimizer": args.optimizer, "lr": args.lr, "schedule": "cosine",
                                 "batch_size": args.batch_size, "epochs": args.epochs,
                                 "augment": augment_cfg.model_dump()},
            "noise": NOISE, "curves": "validation accuracy, mean over seeds, index = epochs trained",
            "final_accuracy": "test split (final_val_accuracy: validation)", "tolerance": TOLERANCE,
            "threads": args.threads, "seconds": round(seconds, 1), "machine": machine_info(), "torch": torch.__version__,
        },
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {json_path}")


def _describe(model) -> str:
    import torch

    dims = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    last = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return f"MLP {'-'.join(map(str, dims + [last]))} ({sum(p.numel() for p in model.parameters()):,} params)"


def _first_epoch(curve: list[float], threshold: float) -> int | None:
    return next((e for e, acc in enumerate(curve) if acc >= threshold), None)


def _summarise(runs, epochs, teacher_val, teacher_test, max_diff, seeds, teacher_desc, student_desc) -> dict:
    mean_curve = {k: [statistics.fmean(c) for c in zip(*(r["val_curve"] for r in v))] for k, v in runs.items()}
    final_val = {k: c[-1] for k, c in mean_curve.items()}
    final_test = {k: statistics.fmean(r["test_accuracy"] for r in v) for k, v in runs.items()}
    to_teacher = {k: _first_epoch(c, teacher_val) for k, c in mean_curve.items()}
    scratch_final = final_val["random_init"]
    to_scratch = {k: _first_epoch(mean_curve[k], scratch_final) for k in ("net2net", "random_pad")}
    targets = {
        "max_abs_diff": max_diff <= TOLERANCE,
        "epochs_to_teacher_accuracy": to_teacher["net2net"] == 0,
        "epochs_to_random_init_final": to_scratch["net2net"] is not None and to_scratch["net2net"] <= epochs / 3,
        "final_accuracy": final_test["net2net"] >= final_test["random_init"],
        "final_val_accuracy": final_val["net2net"] >= final_val["random_init"],
    }
    return {
        "teacher": teacher_desc, "student": student_desc, "max_abs_diff": max_diff,
        "teacher_accuracy": teacher_test, "teacher_val_accuracy": teacher_val,
        "epochs": epochs, "seeds": list(seeds),
        "epochs_to_teacher_accuracy": to_teacher,
        "epochs_to_random_init_final": to_scratch,
        "final_accuracy": final_test,
        "final_val_accuracy": final_val,
        "val_curves": mean_curve,
        "test_accuracy_per_seed": {k: [r["test_accuracy"] for r in v] for k, v in runs.items()},
        "targets_met": targets,
    }


def _print_table(results: dict, args) -> None:
    print(f"Net2Net on MNIST: students trained {args.epochs} epochs ({args.optimizer}, lr {args.lr:g}, cosine, "
          f"batch {args.batch_size}, {'no augmentation' if args.no_augment else 'random shifts/rotations'}); "
          f"means over seeds {args.seeds}; curves on the validation split")
    for name, r in results.items():
        print(f"\n{name}: teacher {r['teacher']} -> student {r['student']}; teacher accuracy val "
              f"{100 * r['teacher_val_accuracy']:.2f}% test {100 * r['teacher_accuracy']:.2f}%; max |logit diff| "
              f"{r['max_abs_diff']:.2e}")
        header = (f"{'start':12} {'val@0':>7} {'val@1':>7} {'val@E/3':>8} {'final val':>9} {'final test':>10} "
                  f"{'epochs to teacher':>17} {'epochs to random_init final':>27}")
        print(header)
        print("-" * len(header))
        third = max(1, r["epochs"] // 3)
        for start, curve in r["val_curves"].items():
            reach = r["epochs_to_random_init_final"].get(start, "-")
            print(f"{start:12} {100 * curve[0]:6.2f}% {100 * curve[min(1, len(curve) - 1)]:6.2f}% "
                  f"{100 * curve[min(third, len(curve) - 1)]:7.2f}% {100 * r['final_val_accuracy'][start]:8.2f}% "
                  f"{100 * r['final_accuracy'][start]:9.2f}% {_fmt(r['epochs_to_teacher_accuracy'][start]):>17} "
                  f"{_fmt(reach):>27}")
        met = ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in r["targets_met"].items())
        print(f"targets: {met}")


def _fmt(v) -> str:
    return "never" if v is None else str(v)


if __name__ == "__main__":
    main()
