"""Knowledge distillation on MNIST through edgec's own pipeline (Hinton, Vinyals, Dean 2015).

    python benchmarks/distillation.py [--data ../shared/data/mnist] [--json benchmarks/results/distillation.json]

A large MLP teacher (784-1200-1200-10, 2.4M parameters, trained with random shifts and rotations) is
trained once with the train stage (seed 0). For each student seed the distill stage then trains a
13x smaller MLP student (784-200-100-10, 178k parameters) on the teacher's soft targets, and, with
``baseline = true``, its scratch twin: the same architecture, initial weights, epochs, data order,
optimizer and schedule, trained on the labels alone. As in Hinton's MNIST experiment the students
get no regularization of their own (no augmentation, no weight decay), so the only difference between
the two students is the soft-target loss.

Reported: test error (the 10,000 MNIST test images) of teacher, scratch student and distilled student,
mean and sample std over the student seeds, and

    gap_closed = (scratch - distilled) / (scratch - teacher)

(Hinton: teacher 0.67%, student 1.46%, distilled 0.74% -> 0.91). Target: gap_closed >= 0.6.

Everything runs through ``edgec.pipeline.runner.run_chain`` with a fresh stage cache, so the figures
are what ``edgec build`` with examples/mnist-distill.toml produces for the same seed.
Torch uses 1 thread by default (--threads): on a busy 2-core machine two spinning OpenMP threads
fighting other processes for the cores ran up to 30x slower than one (measured here; the results
are bit-identical run to run at 1 thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgec.ondevice.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
GAP_TARGET = 0.6

TEACHER = {"name": "mlp", "args": {"widths": [1200, 1200]}}
STUDENT = {"name": "mlp", "args": {"widths": [200, 100]}}
TEACHER_TRAIN = {
    "epochs": 15, "batch_size": 128, "lr": 1e-3, "patience": 15,
    "augment": {"enabled": True, "max_shift": 2.0, "max_rotation": 10.0},
}
STUDENT_DISTILL = {
    "epochs": 20, "batch_size": 128, "lr": 1e-3, "patience": 20,
    "temperature": 8.0, "alpha": 0.5, "baseline": True,
}


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist",
                        help="folder with the four MNIST IDX files (.gz or raw)")
    parser.add_argument("--json", type=Path, default=None,
                        help="result file (default benchmarks/results/distillation.json; none with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    parser.add_argument("--teacher-per-seed", action="store_true",
                        help="train a teacher for every seed instead of once with seed 0 (about 3x the teacher time)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="1 epoch each: checks the script, not distillation")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="stage cache to reuse (default: a fresh temporary one, so everything is trained)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    json_path = args.json or (None if args.quick else ROOT / "benchmarks" / "results" / "distillation.json")

    if not args.data.is_dir():
        raise SystemExit(f"MNIST not found: {args.data} is not a directory. Pass --data DIR, the folder holding "
                         "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                         "t10k-labels-idx1-ubyte.gz")

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: waiting OpenMP threads sleep, not spin
    import torch
    from rich.console import Console

    from edgec.base.architecture import ModelTrust
    from edgec.base.data import load_dataset
    from edgec.base.errors import EdgecError
    from edgec.pipeline.cache import StageCache
    from edgec.pipeline.stages.distill import DistillConfig, DistillStage
    from edgec.pipeline.runner import run_chain
    from edgec.pipeline.source import make_source
    from edgec.pipeline.stage import StageContext
    from edgec.pipeline.stages.train import TrainConfig, TrainStage

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    start = time.perf_counter()
    try:
        data = load_dataset(f"mnist:{args.data}")
    except EdgecError as e:
        raise SystemExit(f"cannot load MNIST from {args.data}: {e}") from None

    train_cfg = dict(TEACHER_TRAIN)
    distill_cfg = dict(STUDENT_DISTILL)
    if args.quick:
        train_cfg.update(epochs=1, patience=1)
        distill_cfg.update(epochs=1, patience=1)
    train_cfg, distill_cfg = TrainConfig(**train_cfg), DistillConfig(
        student=STUDENT["name"], student_args=STUDENT["args"], **distill_cfg)
    console = Console(stderr=True, quiet=args.quiet)
    console.print(f"data {data.summary()}; torch threads {torch.get_num_threads()}; load average {load_start}")

    with tempfile.TemporaryDirectory(prefix="edgec-distill-") as tmp:
        cache = StageCache(args.cache_dir or Path(tmp) / "cache")

        def train_teacher(seed: int):
            ctx = StageContext(data=data, seed=seed, target=None, console=console)
            source = make_source(TEACHER["name"], TEACHER["args"], None, data, seed, cache, ModelTrust())
            (step,) = run_chain([TrainStage(train_cfg)], source, ctx, cache)
            return step

        teachers = {}
        if not args.teacher_per_seed:
            teachers[0] = train_teacher(0)
        rows = []
        for seed in args.seeds:
            if args.teacher_per_seed:
                teachers[seed] = train_teacher(seed)
            teacher = teachers[seed if args.teacher_per_seed else 0]
            ctx = StageContext(data=data, seed=seed, target=None, console=console)
            (step,) = run_chain([DistillStage(distill_cfg)], teacher.artifact, ctx, cache)
            info = step.artifact.info
            rows.append({
                "seed": seed,
                "teacher_seed": seed if args.teacher_per_seed else 0,
                "teacher_error": 1 - info["teacher"]["accuracy"],
                "scratch_error": 1 - info["baseline"]["accuracy"],
                "distilled_error": 1 - info["accuracy"],
                "scratch_val_error": 1 - info["baseline"]["val_accuracy"],
                "distilled_val_error": 1 - info["val_accuracy"],
                "student_params": info["params"],
                "teacher_params": info["teacher"]["params"],
                "distill_seconds": step.seconds,  # distilled student and its scratch twin
            })
    seconds = time.perf_counter() - start

    for r in rows:
        r["gap_closed"] = (r["scratch_error"] - r["distilled_error"]) / (r["scratch_error"] - r["teacher_error"])
    teacher_errors = [1 - t.artifact.info["accuracy"] for t in teachers.values()]
    scratch = [r["scratch_error"] for r in rows]
    distilled = [r["distilled_error"] for r in rows]
    t_mean, t_std = _stats(teacher_errors)
    s_mean, s_std = _stats(scratch)
    d_mean, d_std = _stats(distilled)
    gap = (s_mean - d_mean) / (s_mean - t_mean)
    gap_mean, gap_std = _stats([r["gap_closed"] for r in rows])
    n_test = len(data.y_test)
    teacher_params, student_params = rows[0]["teacher_params"], rows[0]["student_params"]

    def arch(spec):
        return f"{spec['name']} {'-'.join(map(str, spec['args']['widths']))}"

    teacher_note = "per seed" if args.teacher_per_seed else "seed 0, trained once"
    print(f"MNIST distillation: T={distill_cfg.temperature:g}, alpha={distill_cfg.alpha:g}, student {distill_cfg.epochs} epochs, "
          f"teacher {train_cfg.epochs} epochs with augmentation; test error on {n_test} images, "
          f"mean ± sample std over seeds {args.seeds}")
    header = f"{'model':10} {'architecture':16} {'params':>10} {'test error':>16}   per seed"
    print(header)
    print("-" * (len(header) + 30))
    print(f"{'teacher':10} {arch(TEACHER):16} {teacher_params:>10,} {_pct(t_mean, t_std if len(teacher_errors) > 1 else None):>16}   "
          + (", ".join(_pct(e) for e in teacher_errors) if args.teacher_per_seed else f"({teacher_note})"))
    print(f"{'scratch':10} {arch(STUDENT):16} {student_params:>10,} {_pct(s_mean, s_std):>16}   {', '.join(_pct(e) for e in scratch)}")
    print(f"{'distilled':10} {arch(STUDENT):16} {student_params:>10,} {_pct(d_mean, d_std):>16}   {', '.join(_pct(e) for e in distilled)}")
    print(f"teacher/student parameters: {teacher_params / student_params:.1f}x")
    print(f"gap closed: {gap:.3f} (from mean errors; per seed {', '.join(f'{g:.2f}' for g in (r['gap_closed'] for r in rows))}; "
          f"target >= {GAP_TARGET}: {'PASS' if gap >= GAP_TARGET else 'FAIL'})")
    print("Hinton et al. 2015: teacher 0.67%, student 1.46%, distilled 0.74% -> gap closed 0.91")
    print(f"total {seconds:.0f} s (teacher {sum(t.seconds for t in teachers.values()):.0f} s, "
          f"students {sum(r['distill_seconds'] for r in rows):.0f} s); load average {load_start} -> {os.getloadavg()}")

    if json_path is None:
        return
    result = {
        "schema": "edgec-distillation-benchmark", "schema_version": 1,
        "teacher_error": t_mean, "teacher_error_std": t_std, "teacher_error_per_seed": teacher_errors,
        "teacher_seeds": sorted(teachers),
        "scratch_error": s_mean, "scratch_error_std": s_std, "scratch_error_per_seed": scratch,
        "distilled_error": d_mean, "distilled_error_std": d_std, "distilled_error_per_seed": distilled,
        "seeds": args.seeds,
        "gap_closed": gap, "gap_closed_per_seed": [r["gap_closed"] for r in rows],
        "gap_closed_seed_mean": gap_mean, "gap_closed_seed_std": gap_std,
        "gap_target": GAP_TARGET, "pass": gap >= GAP_TARGET,
        "teacher_params": teacher_params, "student_params": student_params,
        "teacher": {**TEACHER, "train": train_cfg.model_dump(mode="json")},
        "student": {**STUDENT, "distill": distill_cfg.model_dump(mode="json")},
        "teacher_once": not args.teacher_per_seed,
        "test_samples": n_test, "train_samples": len(data.y_train), "val_samples": len(data.y_val),
        "rows": rows,
        "seconds": seconds,
        "teacher_seconds": [t.seconds for t in teachers.values()],
        "quick": args.quick,
        "machine": {**machine_info(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_average_start": load_start,
                    "load_average_end": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "reference": "Hinton, Vinyals, Dean 2015 (MNIST): teacher 67, student 146, distilled 74 test errors",
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
