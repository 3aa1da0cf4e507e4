"""Command line: ``python run.py verify|bench|predict`` (inside a bundle) or ``python -m edgec_ondevice``.

Exit codes: 0 ok, 1 a check failed (integrity, test vectors, accuracy), 2 usage error,
bad bundle or missing runtime. Errors are one line on stderr (``--debug`` for a traceback).
"""

import argparse
import json
import os
import sys
import traceback

from .errors import BundleError, SettingsError
from .runtime_base import MAX_THREADS

MAX_BATCH = 1 << 16

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _settings_args(p):
    g = p.add_argument_group("runtime settings (default: the manifest's runtime.recommended)")
    g.add_argument("--threads", type=int, help="number of threads")
    g.add_argument("--xnnpack", choices=("on", "off"), help="TFLite: XNNPACK delegate on/off")
    g.add_argument("--provider", help="ONNX: execution provider (cpu, cuda, tensorrt or a full name)")
    g.add_argument("--graph-opt", choices=("all", "extended", "basic", "disable_all"),
                   help="ONNX: graph optimisation level")


def _common_args(p, bundle_dir):
    p.add_argument("--bundle", default=bundle_dir or ".", help="bundle directory (default: %(default)s)")
    p.add_argument("--runtime", default=None,
                   help="runtime package: ai-edge-litert | tflite-runtime | onnxruntime (default: auto)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser(bundle_dir=None, prog=None):
    ap = argparse.ArgumentParser(prog=prog, description="Verify, benchmark or run an edgec bundle on this device "
                                 "(numpy + the runtime only).")
    sub = ap.add_subparsers(dest="command", metavar="{verify,bench,predict}")
    sub.required = True

    v = sub.add_parser("verify", help="integrity + load + test vectors + accuracy")
    _common_args(v, bundle_dir)
    v.add_argument("--exact", action="store_true", help="demand bit-identical outputs on the test vectors")
    v.add_argument("--no-accuracy", action="store_true", help="skip the eval.npz accuracy run")
    v.add_argument("--json", metavar="FILE", help="write the result as JSON ('-' for stdout)")
    v.add_argument("--markdown", action="store_true", help="print Markdown instead of plain text")
    v.add_argument("--public-key", metavar="KEY",
                   help="check manifest.sig against this Ed25519 public key (edgec.pub) first: refuse an unsigned "
                        "bundle, one signed by another key, or any file changed, added or removed after signing "
                        "(needs the cryptography package)")
    _task_arg(v, "check only this task of a multi-task bundle")
    _settings_args(v)

    b = sub.add_parser("bench", help="latency/throughput/memory, swept over runtime settings")
    _common_args(b, bundle_dir)
    b.add_argument("--warmup", type=int, default=10, help="warmup runs (default: %(default)s)")
    b.add_argument("--warmup-seconds", type=float, default=0.5, help="minimum warmup seconds (default: %(default)s)")
    b.add_argument("--runs", type=int, default=100, help="minimum timed runs at batch 1 (default: %(default)s)")
    b.add_argument("--min-seconds", type=float, default=1.0, help="minimum timed seconds (default: %(default)s)")
    b.add_argument("--max-seconds", type=float, default=30.0, help="cap per timed loop (default: %(default)s)")
    b.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="sweep threads x XNNPACK (TFLite) or provider x graph level (ONNX) (default: on)")
    b.add_argument("--batch-sizes", default="1,8,32", help="throughput batch sizes (default: %(default)s)")
    b.add_argument("--max-threads", type=int,
                   help="sweep threads 1..N (default: min(cpus, max(4, the manifest's build-time threads)))")
    b.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of one fresh subprocess per setting")
    b.add_argument("--no-accuracy", action="store_true", help="skip the eval.npz accuracy run")
    b.add_argument("--ops", action="store_true",
                   help="also time every operator at the best setting: a per-op table (op, type, shape, time, "
                        "share, delegated); TFLite needs ai-edge-litert")
    b.add_argument("--json", metavar="FILE", help="write the result as JSON ('-' for stdout)")
    b.add_argument("--markdown", action="store_true", help="print Markdown instead of plain text")
    b.add_argument("--quiet", action="store_true", help="no per-setting progress lines on stderr")
    b.add_argument("--write-recommended", action=argparse.BooleanOptionalAction, default=True,
                   help="after a full sweep, keep the best setting for this machine in the bundle's "
                        "recommended.json (never in the manifest) (default: on)")
    _task_arg(b, "multi-task bundle: measure this task's accuracy only (every task's model has the same graph)")
    _settings_args(b)

    p = sub.add_parser("predict", help="raw samples (.npy, or .npz with x) -> labels")
    _common_args(p, bundle_dir)
    p.add_argument("file", help="a .npy of raw samples (N, *raw_shape) or one sample; or a .npz with 'x'")
    p.add_argument("--json", metavar="FILE", help="write predictions as JSON ('-' for stdout)")
    _task_arg(p, "multi-task bundle: the task to predict (its labels, its output columns)")
    _settings_args(p)
    return ap


def _task_arg(p, what):
    p.add_argument("--task", metavar="NAME", default=None, help=what)


def _settings_from(args):
    s = {}
    if args.threads is not None:
        if not 1 <= args.threads <= MAX_THREADS:
            raise SettingsError("--threads must be between 1 and %d" % MAX_THREADS, "e.g. --threads 2")
        s["threads"] = args.threads
    if args.xnnpack is not None:
        s["xnnpack"] = args.xnnpack == "on"
    if args.provider:
        s["provider"] = args.provider
    if args.graph_opt:
        s["graph_optimization_level"] = args.graph_opt
    return s or None


def _check_settings_fit(runtime_name, settings):
    if not settings:
        return
    if runtime_name == "tflite" and ({"provider", "graph_optimization_level"} & set(settings)):
        raise SettingsError("--provider/--graph-opt apply to ONNX bundles; this bundle is TFLite",
                            "use --threads/--xnnpack")
    if runtime_name == "onnxruntime" and "xnnpack" in settings:
        raise SettingsError("--xnnpack applies to TFLite bundles; this bundle is ONNX",
                            "use --threads/--provider/--graph-opt")


def _write_json(obj, dest):
    text = json.dumps(obj, indent=2, sort_keys=False, default=str, allow_nan=True)
    if dest == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(dest, "w") as f:
            f.write(text + "\n")


def _load_samples(path):
    import numpy as np
    if not os.path.isfile(path):
        raise BundleError("%s not found" % path, "pass a .npy file of raw samples")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise BundleError("%s cannot be read as .npy/.npz (%s)" % (path, str(e).splitlines()[0] if str(e) else e),
                          "save samples with numpy.save") from e
    if hasattr(data, "files"):
        with data:
            if "x" not in data.files:
                raise BundleError("%s has no 'x' array (has %s)" % (path, ", ".join(data.files)),
                                  "save raw samples as x, e.g. numpy.savez(f, x=samples)")
            return data["x"]
    return data


def _cmd_verify(args, settings):
    from .manifest import load_bundle
    from .report import render_verify
    from .verify import verify_bundle
    if settings:  # (without settings nothing is read before verify checks the signature)
        _check_settings_fit(load_bundle(args.bundle).runtime_name, settings)
    res = verify_bundle(args.bundle, exact=args.exact, runtime=args.runtime, settings=settings,
                        check_accuracy=not args.no_accuracy, public_key=args.public_key, task=args.task)
    if args.json:
        _write_json(res, args.json)
    if args.json != "-":
        sys.stdout.write(render_verify(res, markdown=args.markdown))
    if not res["ok"]:
        sys.stderr.write("error: verify failed: %s\n" % (res["errors"][0] if res["errors"] else "see above"))
        return EXIT_FAILED
    return EXIT_OK


def _cmd_bench(args, settings):
    from .bench import bench_bundle, bench_exit_code
    from .manifest import load_bundle
    from .report import render_bench
    _check_settings_fit(load_bundle(args.bundle).runtime_name, settings)
    try:
        sizes = tuple(int(x) for x in str(args.batch_sizes).split(",") if x.strip())
    except ValueError:
        raise SettingsError("--batch-sizes must be comma-separated integers, got %r" % args.batch_sizes,
                            "e.g. --batch-sizes 1,8,32") from None
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_BATCH or args.runs < 1 or args.warmup < 0:
        raise SettingsError("--batch-sizes must be 1..%d, --runs >= 1 and --warmup >= 0" % MAX_BATCH,
                            "e.g. --runs 100")
    if args.max_threads is not None and not 1 <= args.max_threads <= MAX_THREADS:
        raise SettingsError("--max-threads must be between 1 and %d" % MAX_THREADS, "e.g. --max-threads 4")

    def progress(line):
        if not args.quiet:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
    res = bench_bundle(args.bundle, warmup=args.warmup, runs=args.runs, min_seconds=args.min_seconds,
                       sweep=args.sweep, batch_sizes=sizes, runtime=args.runtime,
                       warmup_seconds=args.warmup_seconds, max_seconds=args.max_seconds, settings=settings,
                       max_threads=args.max_threads, isolate=not args.in_process, accuracy=not args.no_accuracy,
                       progress=progress, save_recommendation=args.write_recommended, task=args.task)
    if args.ops and res.get("recommended") is not None:
        from .op_profile import profile_ops
        progress("timing each operator")
        res["ops_profile"] = profile_ops(load_bundle(args.bundle), res["recommended"], args.runtime)
    if args.json:
        _write_json(res, args.json)
    if args.json != "-":
        sys.stdout.write(render_bench(res, markdown=args.markdown))
    code = bench_exit_code(res)
    if code:
        why = res["errors"][0] if res["errors"] else "test vectors disagree with the runtime's outputs"
        sys.stderr.write("error: bench failed: %s\n" % why)
    return code


def _cmd_predict(args, settings):
    from .evaluate import predict_labels
    from .manifest import load_bundle
    bundle = load_bundle(args.bundle)
    _check_settings_fit(bundle.runtime_name, settings)
    bundle.require_intact()
    raw = _load_samples(args.file)
    from .tasks import bundle_tasks, open_task_model, select_task, task_labels
    task = select_task(bundle, args.task) if args.task is not None or bundle_tasks(bundle.manifest) else None
    if task is not None:  # a multi-task bundle: the task's own model and output columns
        model, labels = open_task_model(bundle, task, settings, runtime=args.runtime), task_labels(task)
    else:
        model, labels = bundle.open_model(settings, runtime=args.runtime), bundle.labels()
    preds = predict_labels(model, raw, labels)
    if args.json:
        _write_json({"file": args.file, "predictions": preds}, args.json)
    if args.json != "-":
        sys.stdout.write(_predict_table(preds, getattr(model, "task", "classification"), labels))
    return EXIT_OK


def _predict_table(preds, task, labels):
    """Tab-separated, one header line, then a row per sample in the task's own words."""
    if task == "regression":
        width = len(preds[0]["values"]) if preds else len(labels)
        names = [labels[j] if j < len(labels) else "y%d" % j for j in range(width)]
        rows = ["\t".join(["%d" % p["index"]] + ["%.6g" % v for v in p["values"]]) for p in preds]
        header = ["index"] + names
    elif task == "reconstruction":
        rows = ["%d\t%.6g" % (p["index"], p["score"]) for p in preds]
        header = ["index", "anomaly score (reconstruction error)"]
    else:
        rows = ["%d\t%s\t%d\t%.4f" % (p["index"], p["label"], p["class"], p["score"]) for p in preds]
        header = ["index", "label", "class", "score (top logit)"]
    return "\n".join(["\t".join(header)] + rows) + "\n"


def main(argv=None, bundle_dir=None, prog=None):
    """Run the CLI; returns the exit code (does not call sys.exit)."""
    parser = build_parser(bundle_dir, prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or usage error (2)
        return int(e.code or 0)
    debug = getattr(args, "debug", False)
    if debug:
        os.environ["EDGEC_DEBUG"] = "1"  # native runtimes' log lines are shown too (quiet.py)
    try:
        settings = _settings_from(args)
        cmd = {"verify": _cmd_verify, "bench": _cmd_bench, "predict": _cmd_predict}[args.command]
        return cmd(args, settings)
    except BundleError as e:
        if debug:  # the traceback as well; the exit code stays the same
            traceback.print_exc()
        sys.stderr.write("error: %s\n" % e)
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as e:
        if debug:  # the traceback as well; the exit code stays the same
            traceback.print_exc()
        msg = " ".join(str(e).split())[:300]
        hint = "" if debug else " (hint: rerun with --debug for a traceback)"
        sys.stderr.write("error: %s: %s%s\n" % (type(e).__name__, msg, hint))
        return EXIT_USAGE
