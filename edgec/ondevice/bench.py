"""bench: latency / throughput / memory / accuracy of a bundle, swept over runtime settings.

Conventions (TFLite benchmark_model, onnxruntime_perf_test, MLPerf Tiny):

* per setting: load time (interpreter / session creation incl. allocation), first
  inference, warmup (``warmup`` runs and ``warmup_seconds``), then timed runs at batch 1
  until both ``runs`` and ``min_seconds`` are reached (cap ``max_seconds``);
  p50/p90/p95/p99/mean/std/min/max in ms.
* timed region: one inference call on an input already converted to the runtime's dtype
  (TFLite: set_tensor + invoke + get_tensor; ONNX: session.run incl. output fetch);
  preprocessing and (de)quantization are outside it. ``harness.overhead_ms_per_iteration``
  is the cost of an empty timed iteration, measured the same way.
* throughput (samples/s) for each batch size: natively (resized input / dynamic batch,
  checked against batch-1 outputs) when the runtime allows it, else a loop of batch-1
  calls (``mode: "loop"``).
* memory: ``ru_maxrss`` peak. With ``isolate=True`` (default) every setting runs in a
  fresh Python subprocess, so the figure is that process's peak (Python + numpy +
  runtime + one model) and load/first-inference times are cold; ``peak_rss_bytes`` is
  taken after the batch-1 runs (before other batch sizes load more copies).
  With ``isolate=False`` it is this process's peak, including whatever the caller loaded.
* best setting: lowest p50 at batch 1 among the settings that reproduce the test vectors (when
  any does) and whose p99 is within TAIL_FACTOR (2x) of the lowest p99 (a fast median with a long
  tail is not best; ties: fewer threads); returned as
  ``recommended`` and,
  with ``save_recommendation``, kept for this machine in the bundle's recommended.json
  (``recommend.py``): never in the manifest, never applied to another machine.
* accuracy on eval.npz (full set) and agreement with test vectors for the best setting.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from .errors import BundleError
from .integrity import RECOMMENDED_NAME
from .evaluate import accuracy as eval_accuracy
from .evaluate import check_vectors
from .machine import machine_info, peak_rss_bytes, usable_cpu_count
from .manifest import load_bundle
from .recommend import machine_identity, machine_key, store_recommendation
from .runtime_base import as_threads
from .runtimes import import_runtime, normalize_settings, settings_id, sweep_grid
from .timing import harness_overhead_ms, summarize, timed_loop, timer_resolution_ns

BENCH_SCHEMA = "edgec-bench"
BENCH_SCHEMA_VERSION = 1
DEFAULT_THREAD_CAP = 4
TIMED_REGION = ("one inference on a pre-converted input (TFLite: set_tensor+invoke+get_tensor; "
                "ONNX: session.run); preprocessing and (de)quantization excluded")
_BOOT = (
    "import importlib.util, sys\n"
    "d = sys.argv[1]\n"
    "spec = importlib.util.spec_from_file_location('edgec_ondevice', d + '/__init__.py',"
    " submodule_search_locations=[d])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules['edgec_ondevice'] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "from edgec_ondevice.bench import worker_main\n"
    "sys.exit(worker_main(sys.argv[2], sys.argv[3]))\n"
)


def _clean(settings):
    return {k: v for k, v in settings.items() if k != "providers"}


def _probe_vectors(bundle, model):
    tv = bundle.test_vectors()
    if tv is not None and len(tv["inputs"]):
        return tv, np.asarray(tv["inputs"], dtype=np.float32).reshape((-1,) + model.sample_shape)
    rng = np.random.default_rng(0)
    return None, rng.standard_normal((8,) + model.sample_shape).astype(np.float32)


def _throughput(bundle, model, settings, package, batch, xs, runs, min_seconds, max_seconds, atol):
    """samples/s at ``batch``: native batch when possible, else a loop of batch-1 calls."""
    reps = int(math.ceil(batch / float(len(xs))))
    xb = np.concatenate([xs] * reps)[:batch]
    mode, note, mb = "loop", None, None
    if batch == 1:
        mode, step = "native", model.prepare(xb)
    else:
        if model.batch_size is None:
            mb = model
        else:
            mb = bundle.open_model(settings, runtime=package)
            if not mb.set_batch_size(batch):
                note = mb.notes[-1] if mb.notes else "runtime refused batch %d" % batch
                mb.close()
                mb = None
        if mb is not None:
            try:
                got = mb.run_model_input(xb)
                want = model.run_model_input(xb)  # batch-1 (or dynamic) reference
                tol = max(float(atol), 1e-5, (mb.output_quant or (0.0, 0))[0] * 1.01)
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=tol):
                    note = "batch %d: native batched outputs differ from batch-1 outputs; looped instead" % batch
                else:
                    mode = "native"
            except Exception as e:
                note = "batch %d: native run failed (%s); looped instead" % (batch, str(e).splitlines()[0][:200])
        if mode == "native":
            step = mb.prepare(xb)
        else:
            singles = [model.prepare(xb[i:i + 1]) for i in range(batch)]

            def step():
                for s in singles:
                    s()
    step()
    step()  # warmup
    n = max(3, int(math.ceil(runs / float(batch))))
    d, _ = timed_loop(step, n, min_seconds, max_seconds)
    total = float(d.sum()) / 1e9
    if mb is not None and mb is not model:
        mb.close()
    return {"batch_size": batch, "mode": mode, "calls": int(d.size),
            "samples_per_s": (batch * d.size / total) if total > 0 else None,
            "batch_ms_p50": float(np.median(d)) / 1e6 if d.size else None, "note": note}


def measure_setting(path, settings, runtime=None, warmup=10, warmup_seconds=0.5, runs=100,
                    min_seconds=1.0, max_seconds=30.0, batch_sizes=(1, 8, 32), checkpoint=None):
    """Measure one settings dict in this process. Returns the per-setting dict (see bench_bundle).

    ``checkpoint(partial_result)`` is called after each phase (the subprocess worker saves it,
    so a runtime crash in a later phase still leaves the batch-1 figures)."""
    out = {"id": settings_id(settings), "settings": dict(settings), "ok": False, "error": None, "notes": [],
           "phase": "load"}
    save = checkpoint or (lambda _r: None)
    rss_start = peak_rss_bytes()
    bundle = load_bundle(path)
    t0 = time.perf_counter()
    rt = import_runtime(bundle.runtime_name, runtime)
    out["import_ms"] = (time.perf_counter() - t0) * 1e3
    rss_before = peak_rss_bytes()
    model = bundle.open_model(settings, runtime=rt.package)
    out["effective_settings"] = model.settings
    out["notes"].extend(model.notes)
    out["load_ms"] = model.load_seconds * 1e3
    tv, xs = _probe_vectors(bundle, model)
    b0 = 1
    if model.batch_size not in (None, 1) and not model.set_batch_size(1):
        b0 = model.batch_size
        out["notes"].append("the model has a fixed batch of %d: latency is per call of %d samples" % (b0, b0))
    x0 = np.concatenate([xs] * int(math.ceil(b0 / float(len(xs)))))[:b0]
    step = model.prepare(x0)
    t = time.perf_counter()
    step()
    out["first_inference_ms"] = (time.perf_counter() - t) * 1e3
    wd, ws = timed_loop(step, warmup, warmup_seconds, max_seconds)
    out["warmup"] = {"runs": int(wd.size), "seconds": ws}
    d, _ = timed_loop(step, max(1, int(runs)), min_seconds, max_seconds)
    out["latency_ms"] = summarize(d)
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["rss_before_load_bytes"] = rss_before
    out["rss_at_start_bytes"] = rss_start
    out["harness_overhead_ms"] = harness_overhead_ms()
    if tv is not None:
        vec = check_vectors(model, tv, bundle.atol_for(rt.package))
        out["vectors"] = {k: vec.get(k) for k in ("count", "ok", "max_abs_diff", "top1_agreement", "n_failed",
                                                  "failed_indices")}
    else:
        out["vectors"] = None
        out["notes"].append("no test vectors: timed on random inputs")
    total = float(d.sum()) / 1e9
    thr = [{"batch_size": 1, "mode": "native", "calls": int(d.size),
            "samples_per_s": b0 * d.size / total if total > 0 else None,
            "batch_ms_p50": out["latency_ms"]["p50"], "note": None}]
    out["throughput"] = thr
    out["batch_sizes_native"] = [1]
    out["ok"] = True
    for b in batch_sizes:
        b = int(b)
        if b <= 1:
            continue
        out["phase"] = "throughput at batch %d" % b
        save(out)
        try:
            thr.append(_throughput(bundle, model, settings, rt.package, b, xs, runs, min_seconds / 4.0,
                                   max_seconds, bundle.atol))
        except Exception as e:
            thr.append({"batch_size": b, "mode": None, "calls": 0, "samples_per_s": None, "batch_ms_p50": None,
                        "note": "batch %d failed: %s" % (b, str(e).splitlines()[0][:200] if str(e) else e)})
        out["batch_sizes_native"] = [t["batch_size"] for t in thr if t["mode"] == "native"]
    out["peak_rss_bytes_all_batches"] = peak_rss_bytes()
    out["phase"] = "done"
    model.close()
    return out


def worker_main(request_path, result_path):
    """Subprocess entry: read a JSON request, measure, write the JSON result."""
    with open(request_path) as f:
        req = json.load(f)

    def checkpoint(partial):
        tmp = result_path + ".part"
        with open(tmp, "w") as f:
            json.dump(partial, f)
        os.replace(tmp, result_path)
    try:
        res = measure_setting(req["bundle"], req["settings"], req.get("runtime"), req["warmup"],
                              req["warmup_seconds"], req["runs"], req["min_seconds"], req["max_seconds"],
                              req["batch_sizes"], checkpoint=checkpoint)
    except BundleError as e:
        res = {"ok": False, "error": str(e), "settings": req["settings"], "id": settings_id(req["settings"])}
    except Exception as e:  # keep the sweep going; report the one line
        res = {"ok": False, "error": "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else ""),
               "settings": req["settings"], "id": settings_id(req["settings"])}
    with open(result_path, "w") as f:
        json.dump(res, f)
    return 0


def _package_dir():
    return os.path.dirname(os.path.abspath(__file__))


def _measure_isolated(path, settings, runtime, params, timeout):
    with tempfile.TemporaryDirectory(prefix="edgec-bench-") as tmp:
        req_path, res_path = os.path.join(tmp, "req.json"), os.path.join(tmp, "res.json")
        req = dict(params, bundle=os.path.abspath(path), settings=settings, runtime=runtime)
        with open(req_path, "w") as f:
            json.dump(req, f)
        # never read bytecode from the bundle's __pycache__ (not in the file table)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=os.path.join(tmp, "pycache"))
        # cwd: the temp dir, so that nothing in the caller's folder (the bundle, for run.py) is importable
        proc = subprocess.run([sys.executable, "-B", "-c", _BOOT, _package_dir(), req_path, res_path],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=timeout, cwd=tmp)
        res = None
        if os.path.isfile(res_path):
            with open(res_path) as f:
                res = json.load(f)
        if proc.returncode == 0 and res is not None:
            return res
        tail = [ln for ln in proc.stderr.decode("utf-8", "replace").splitlines()
                if ln.strip() and not ln.startswith("INFO:")]
        how = "signal %d" % -proc.returncode if proc.returncode < 0 else "exit code %d" % proc.returncode
        why = "benchmark worker died (%s)%s" % (how, ": " + tail[-1][:200] if tail else "")
        if res is None or not res.get("ok"):
            return {"ok": False, "id": settings_id(settings), "settings": settings, "error": why}
        # crashed after the batch-1 phase: keep what was measured, name the phase that crashed
        done = {t["batch_size"] for t in res.get("throughput") or []}
        for b in params["batch_sizes"]:
            if b not in done:
                res["throughput"].append({"batch_size": b, "mode": None, "calls": 0, "samples_per_s": None,
                                          "batch_ms_p50": None, "note": "batch %d not measured (worker crashed)" % b})
        res["notes"].append("%s during %s" % (why, res.get("phase")))
        return res


def _thread_cap(bundle, max_threads):
    """Threads 1..cap are swept. Only this machine's CPUs bound the cap: never a setting measured on
    another machine (recommended.json is per machine), nor the build-time default below 4."""
    if max_threads:
        cap = as_threads(max_threads, strict=True)
        return cap, "max_threads argument"
    rec = bundle.recommended_settings.get("threads")
    want = max(DEFAULT_THREAD_CAP, rec or 0)
    return min(usable_cpu_count(), want), "min(cpus, max(%d, the manifest's build-time threads))" % DEFAULT_THREAD_CAP


TIE_BAND = 0.01
TAIL_FACTOR = 2.0
BEST_CRITERION = ("lowest p50 latency at batch 1 among settings that reproduce the test vectors and whose p99 "
                  "is within %gx of the lowest p99 (within 1%% of that p50 counts as a tie: fewer threads wins)"
                  % TAIL_FACTOR)


def _pick_best(ok):
    """The best setting, those its tail ruled out, and the faster ones whose outputs miss the test
    vectors. A setting that does not reproduce the vectors is never best while another does: TFLite's
    built-in int8 kernels (XNNPACK off) round differently from XNNPACK's, by 3-4 output steps on a
    96x96 MobileNetV2 (x86 and the emulated Pi core), and recommending them would make this machine's
    ``verify`` fail a good bundle. Only settings whose p99 is within TAIL_FACTOR of the lowest p99
    compete (a median bought with a long tail, e.g. a spinning second thread on a busy core, is not
    best); among them the lowest p50, where settings within TIE_BAND (1%) of it count as tied and the
    one with fewest threads wins (then lowest p50): spare cores matter more than 1%."""
    if not ok:
        return None, [], []
    reproducing = [r for r in ok if (r.get("vectors") or {}).get("ok") is not False] or ok
    tail = min(r["latency_ms"]["p99"] for r in reproducing) * TAIL_FACTOR
    steady = [r for r in reproducing if r["latency_ms"]["p99"] <= tail]
    low = min(r["latency_ms"]["p50"] for r in steady)
    tied = [r for r in steady if r["latency_ms"]["p50"] <= low * (1.0 + TIE_BAND)]
    best = min(tied, key=lambda r: (r["settings"].get("threads") or 0, r["latency_ms"]["p50"]))
    faster = [r for r in ok if r["latency_ms"]["p50"] < best["latency_ms"]["p50"]]
    missed = [r for r in faster if r not in reproducing]
    return best, [r for r in faster if r in reproducing and r not in steady], missed


def bench_bundle(path, warmup=10, runs=100, min_seconds=1.0, sweep=True, batch_sizes=(1, 8, 32), runtime=None,
                 warmup_seconds=0.5, max_seconds=30.0, settings=None, max_threads=None, isolate=True,
                 accuracy=True, check_integrity=True, progress=None, save_recommendation=False, task=None):
    """Benchmark a bundle on this machine; returns an ``edgec-bench`` dict.

    ``settings`` fixes some settings (e.g. ``{"threads": 2}``): a sweep then only varies the
    others; without a sweep the manifest's ``runtime.recommended`` overlaid by ``settings`` is
    measured (the manifest's build-time default, or this machine's entry in recommended.json).
    ``progress`` is an optional ``callable(str)`` for one line per setting.
    ``save_recommendation``: after a full sweep, store the best setting for this machine in the
    bundle's recommended.json (``recommend.py``; never in the manifest).
    Raises BundleError (IntegrityError when a file is corrupt, RuntimeMissingError, ...).

    Fields: ``schema``, ``schema_version``, ``ok``, ``bundle``, ``target``, ``model_file``,
    ``created_utc``, ``system`` (machine_info()), ``machine``, ``runtime`` {name, package, version},
    ``config`` {warmup, warmup_seconds, runs, min_seconds, max_seconds, batch_sizes, sweep,
    isolate, max_threads, thread_cap_rule}, ``size`` {model_bytes, transport_bytes,
    reference_fp32_bytes, model_file_bytes}, ``harness`` {timer, timer_resolution_ns,
    overhead_ms_per_iteration, timed_region, percentiles, std, gc}, ``memory`` {scope, measure},
    ``settings`` [per setting: id, settings, effective_settings, ok, error, notes, import_ms,
    load_ms, first_inference_ms, warmup {runs, seconds}, latency_ms {runs, seconds, p50, p90,
    p95, p99, mean, std, min, max}, throughput [{batch_size, mode, calls, samples_per_s,
    batch_ms_p50, note}], batch_sizes_native, peak_rss_bytes, peak_rss_bytes_all_batches,
    rss_before_load_bytes, harness_overhead_ms, vectors {count, ok, max_abs_diff,
    top1_agreement, n_failed, failed_indices}], ``best`` {id, settings, p50_ms, criterion},
    ``recommended`` (settings dict: the best for this machine), ``machine_key`` (its key in
    recommended.json), ``recommendation`` {file, key, saved, note}, ``latency_ms``, ``throughput``, ``load_ms``,
    ``first_inference_ms``, ``peak_rss_bytes``, ``vectors`` (the best setting's),
    ``accuracy`` {accuracy, correct, eval_samples, manifest_accuracy, settings_id} | None (classification),
    ``quality`` {task, metric, value, higher_is_better, mse, auc | mae, rmse, r2, eval_samples, manifest_value,
    settings_id} (regression / reconstruction bundles only),
    ``notes``, ``errors``, ``seconds``.
    """
    t_start = time.perf_counter()
    bundle = load_bundle(path)
    if check_integrity:
        bundle.require_intact()
    rt = import_runtime(bundle.runtime_name, runtime)
    notes = []
    note = bundle.runtime_min_version_note(rt)
    if note:
        notes.append(note)
    grid, fixed_keys, cap, cap_rule = _settings_grid(bundle, rt, settings, sweep, max_threads, notes)
    batch_sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1} | {1})
    params = {"warmup": int(warmup), "warmup_seconds": float(warmup_seconds), "runs": int(runs),
              "min_seconds": float(min_seconds), "max_seconds": float(max_seconds) if max_seconds else None,
              "batch_sizes": batch_sizes}
    if isolate and not sys.executable:
        isolate = False
        notes.append("no Python executable to start workers: measured in this process")
    per_worker_timeout = 120 + (float(max_seconds or 60) + float(warmup_seconds)) * (2 + len(batch_sizes))
    results, isolate = _measure_grid(path, grid, rt, params, isolate, per_worker_timeout, notes, progress)
    errors = ["%s: %s" % (r["id"], r.get("error")) for r in results if not r.get("ok")]
    ok = [r for r in results if r.get("ok")]
    best, tail_excluded, vectors_excluded = _pick_best(ok)
    sysinfo = machine_info()
    identity = machine_identity(rt, sysinfo)
    res = _result(bundle, rt, sysinfo, identity, results, best, notes, errors)
    res["config"] = dict(params, sweep=bool(sweep), isolate=bool(isolate), max_threads=cap, thread_cap_rule=cap_rule,
                         settings_measured=len(grid))
    res["memory"]["scope"] = ("fresh subprocess per setting" if isolate else
                              "this process (process-wide: includes everything the caller imported)")
    if best is not None:
        _adopt_best(res, best, ok, tail_excluded, vectors_excluded)
        if task is not None:
            from .tasks import select_task
            select_task(bundle, task)  # an unknown task (or a single-task bundle) is a usage error
        if accuracy:
            _measure_accuracy(res, bundle, rt, best, task)
    if save_recommendation:
        res["recommendation"] = _save(bundle, rt, identity, res, sweep, fixed_keys, len(grid))
        if res["recommendation"]["note"]:
            notes.append(res["recommendation"]["note"])
    res["seconds"] = time.perf_counter() - t_start
    return res


def _settings_grid(bundle, rt, settings, sweep, max_threads, notes):
    """``(grid, fixed_keys, thread cap, its rule)``: the settings dicts to measure (the sweep, or the one
    setting this machine opens the model with), and the keys of ``settings`` held fixed in them."""
    fixed = normalize_settings(bundle.runtime_name, settings, strict=True) if settings else {}
    fixed_keys = [k for k in (settings or {}) if k in ("threads", "num_threads", "xnnpack", "provider",
                                                      "graph_optimization_level")]
    fixed_keys = ["threads" if k == "num_threads" else k for k in fixed_keys]
    cap, cap_rule = _thread_cap(bundle, max_threads)
    if sweep:
        grid = sweep_grid(bundle.runtime_name, cap, bundle.requested_providers, notes)
        if fixed_keys:
            grid = [g for g in grid if all(g.get(k) == fixed[k] for k in fixed_keys)] or \
                [dict(grid[0], **{k: fixed[k] for k in fixed_keys})]
        return grid, fixed_keys, cap, cap_rule
    base, base_notes = bundle.settings_for(rt)
    base = base or normalize_settings(bundle.runtime_name, {})
    notes.extend(base_notes)
    base.update({k: fixed[k] for k in fixed_keys})
    return [_clean(base)], fixed_keys, cap, cap_rule


def _measure_grid(path, grid, rt, params, isolate, timeout, notes, progress):
    """``(results, isolate)``: one per-setting dict per grid entry, each in a worker process while workers
    start (``isolate`` turns False, with a note, when one cannot)."""
    results = []
    for i, s in enumerate(grid):
        if isolate:
            try:
                r = _measure_isolated(path, s, rt.package, params, timeout)
            except subprocess.TimeoutExpired:
                r = {"ok": False, "id": settings_id(s), "settings": s,
                     "error": "benchmark worker timed out after %.0f s" % timeout}
            except (OSError, subprocess.SubprocessError) as e:
                isolate = False
                notes.append("could not start a worker process (%s): measured in this process" % e)
        if not isolate:
            try:
                r = measure_setting(path, s, rt.package, **params)
            except BundleError as e:
                r = {"ok": False, "id": settings_id(s), "settings": s, "error": str(e)}
            except Exception as e:  # one setting failing must not lose the others
                r = {"ok": False, "id": settings_id(s), "settings": s,
                     "error": "%s: %s" % (type(e).__name__, " ".join(str(e).split())[:200])}
        results.append(r)
        if progress:
            progress(_progress_line(i, len(grid), r))
    return results, isolate


def _progress_line(i, n, r):
    if not r.get("ok"):
        return "[%d/%d] %s: FAILED %s" % (i + 1, n, r["id"], r.get("error"))
    p50 = r["latency_ms"]["p50"]
    shown = ("%.2f us" % (p50 * 1e3)) if p50 < 1.0 else ("%.3f ms" % p50)
    return "[%d/%d] %s: p50 %s, load %.1f ms" % (i + 1, n, r["id"], shown, r["load_ms"])


def _result(bundle, rt, sysinfo, identity, results, best, notes, errors):
    """The ``edgec-bench`` dict before the best setting's figures are filled in (``config`` and
    ``memory.scope`` are set by the caller)."""
    man_size = bundle.manifest.get("size") or {}
    return {
        "schema": BENCH_SCHEMA, "schema_version": BENCH_SCHEMA_VERSION, "ok": best is not None,
        "bundle": bundle.path, "target": bundle.target_name, "model_file": bundle.model_file,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "system": sysinfo, "machine": sysinfo["machine"], "runtime": rt.as_dict(),
        "config": None,
        "size": {"model_bytes": man_size.get("model_bytes"), "transport_bytes": man_size.get("transport_bytes"),
                 "reference_fp32_bytes": man_size.get("reference_fp32_bytes"),
                 "model_file_bytes": os.path.getsize(bundle.model_path) if os.path.isfile(bundle.model_path)
                 else None},
        "harness": {"timer": "time.perf_counter_ns", "timer_resolution_ns": timer_resolution_ns(),
                    "overhead_ms_per_iteration": None, "timed_region": TIMED_REGION,
                    "percentiles": "numpy linear interpolation", "std": "population (ddof=0)",
                    "gc": "disabled during timed loops"},
        "memory": {"scope": None,
                   "measure": "resource.getrusage(RUSAGE_SELF).ru_maxrss (process peak) after the batch-1 runs"},
        "settings": results, "best": None, "recommended": None, "machine_key": machine_key(identity),
        "recommendation": None, "latency_ms": None, "throughput": None,
        "load_ms": None, "first_inference_ms": None, "peak_rss_bytes": None, "vectors": None,
        "accuracy": None, "notes": notes, "errors": errors, "seconds": None,
    }


def _adopt_best(res, best, ok, tail_excluded, vectors_excluded):
    """The best setting's figures as the result's own; its notes join the result's."""
    overheads = [r["harness_overhead_ms"] for r in ok if r.get("harness_overhead_ms") is not None]
    res["harness"]["overhead_ms_per_iteration"] = float(np.median(overheads)) if overheads else None
    res["best"] = {"id": best["id"], "settings": _clean(best["settings"]), "p50_ms": best["latency_ms"]["p50"],
                   "criterion": BEST_CRITERION,
                   "excluded_for_tail": [{"id": r["id"], "p50_ms": r["latency_ms"]["p50"],
                                          "p99_ms": r["latency_ms"]["p99"]} for r in tail_excluded],
                   "excluded_for_vectors": [{"id": r["id"], "p50_ms": r["latency_ms"]["p50"],
                                             "max_abs_diff": r["vectors"].get("max_abs_diff")} for r in vectors_excluded]}
    res["recommended"] = _clean(best["settings"])
    for k in ("latency_ms", "throughput", "load_ms", "first_inference_ms", "peak_rss_bytes", "vectors"):
        res[k] = best.get(k)
    notes = res["notes"]
    for n in (best.get("notes") or []) + [t["note"] for t in best.get("throughput") or [] if t.get("note")]:
        if n not in notes:
            notes.append(n)


def _measure_accuracy(res, bundle, rt, best, task):
    """Accuracy (or quality) with the best setting: a multi-task bundle's per task on each task's eval file
    with its own model (latency is the top-level model's: every task's model has the same graph), else on
    eval.npz."""
    from .tasks import bundle_tasks, task_accuracies  # lazily: tasks.py requires lzma, a single-task bundle does not
    if task is not None or bundle_tasks(bundle.manifest):
        per_task = task_accuracies(bundle, res["recommended"], rt.package, only=task)
        res["tasks"] = per_task
        if per_task:
            n = sum(a["eval_samples"] for a in per_task.values())
            res["accuracy"] = {"accuracy": sum(a["accuracy"] for a in per_task.values()) / len(per_task),
                               "correct": sum(a["correct"] for a in per_task.values()), "eval_samples": n,
                               "manifest_accuracy": (bundle.manifest.get("metrics") or {}).get("accuracy"),
                               "settings_id": best["id"], "tasks": sorted(per_task)}
        return
    ev = bundle.eval_set()
    if ev is None:
        res["notes"].append("eval.npz not in the bundle: accuracy not measured")
        return
    model = bundle.open_model(res["recommended"], runtime=rt.package)
    if bundle.task != "classification":  # regression / reconstruction: the task's figures
        res["quality"] = _task_quality(bundle, model, ev, best["id"])
    else:
        acc = eval_accuracy(model, ev[0], ev[1])
        acc["manifest_accuracy"] = (bundle.manifest.get("metrics") or {}).get("accuracy")
        acc["settings_id"] = best["id"]
        res["accuracy"] = acc
    model.close()


def _save(bundle, rt, identity, res, sweep, fixed_keys, measured):
    """Store the best setting in recommended.json for this machine (see recommend.py)."""
    out = {"file": RECOMMENDED_NAME, "key": res["machine_key"], "saved": False, "note": None}
    vec = res.get("vectors")
    if not res["ok"] or (vec and not vec.get("ok")):
        out["note"] = "no setting saved to %s: no setting passed" % RECOMMENDED_NAME
    elif not sweep or fixed_keys:
        out["note"] = ("no setting saved to %s: only a full sweep (no fixed settings) measures the best"
                       % RECOMMENDED_NAME)
    else:
        try:
            _key, notes = store_recommendation(bundle.path, bundle.runtime_name, identity, res["recommended"],
                                               p50_ms=res["best"]["p50_ms"], settings_measured=measured)
        except OSError as e:
            out["note"] = "could not write %s (%s): the recommendation was not saved" % (
                RECOMMENDED_NAME, e.strerror or e)
        else:
            out["saved"] = True
            out["note"] = ("saved %s as this machine's setting in %s (key %s)%s" % (
                settings_id(res["recommended"]), RECOMMENDED_NAME, res["machine_key"],
                "; " + notes[0] if notes else ""))
    return out


def _task_quality(bundle, model, ev, settings_id):
    """``quality`` of a regression / reconstruction bundle on eval.npz (evaluate.task_quality): its
    headline figure (``metric``, ``value``), every figure of the task, the manifest's ``eval_<metric>``."""
    from .evaluate import task_quality

    q = task_quality(model, ev[0], ev[1], bundle.task, bundle.manifest.get("postprocessing"))
    q["manifest_value"] = (bundle.manifest.get("metrics") or {}).get("eval_%s" % q["metric"]) if q["metric"] else None
    q["settings_id"] = settings_id
    return q


def bench_exit_code(result):
    if not result.get("ok"):
        return 1
    v = result.get("vectors")
    return 1 if v and not v.get("ok") else 0

