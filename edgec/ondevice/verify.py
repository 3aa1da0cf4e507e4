"""verify: integrity + load + test-vector reproduction + accuracy, as one result dict."""

import time

from .errors import IntegrityError, ManifestError, ModelLoadError
from .evaluate import accuracy as eval_accuracy
from .evaluate import check_vectors
from .integrity import describe_problem
from .machine import machine_info
from .manifest import EVAL_NAME, TEST_VECTORS_NAME, load_bundle
from .runtimes import import_runtime, settings_id

VERIFY_SCHEMA = "edgec-verify"
VERIFY_SCHEMA_VERSION = 1
DEFAULT_ACCURACY_TOLERANCE = 0.01


def _check(name, ok, detail, skipped=False):
    return {"name": name, "ok": bool(ok), "skipped": bool(skipped), "detail": detail}


def _check_transport(bundle):
    """Decode ``size.transport_file`` (``transport.py``) and compare it byte for byte with the model file."""
    import hashlib
    import os

    from .transport import TransportError, decode

    name = (bundle.manifest.get("size") or {}).get("transport_file")
    if not name:
        return None
    try:
        with open(os.path.join(bundle.path, name), "rb") as f:
            payload = f.read()
        decoded = decode(payload)
    except (OSError, TransportError) as e:
        return _check("transport", False, "%s does not decode (%s)" % (name, e))
    with open(bundle.model_path, "rb") as f:
        model_sha = hashlib.sha256(f.read()).hexdigest()
    if hashlib.sha256(decoded).hexdigest() != model_sha:
        return _check("transport", False, "%s does not decode to %s" % (name, bundle.manifest["model_file"]))
    return _check("transport", True, "%s (%d bytes) decodes to %s exactly" % (
        name, os.path.getsize(os.path.join(bundle.path, name)), bundle.manifest["model_file"]))


def verify_bundle(path, exact=False, runtime=None, settings=None, check_accuracy=True):
    """Verify a bundle on this machine.

    Raises BundleError subclasses when the bundle cannot be verified at all (not a bundle,
    bad manifest, schema too new, runtime missing). Check failures do not raise; they
    make ``result["ok"]`` False and are listed in ``result["errors"]`` (one line each,
    naming the file or vector index).

    Result fields: ``schema`` ("edgec-verify"), ``schema_version``, ``ok``, ``bundle``,
    ``target``, ``model_file``, ``machine`` (platform.machine()), ``system`` (machine_info()),
    ``runtime`` ({name, package, version}), ``settings``, ``notes``, ``load_ms``,
    ``checks`` ([{name, ok, skipped, detail}] for integrity, load, test_vectors, accuracy),
    ``integrity`` (integrity.check_files report), ``test_vectors`` (evaluate.compare_outputs
    result), ``max_abs_diff``, ``vectors``, ``top1_agreement``, ``accuracy``,
    ``eval_samples``, ``manifest_accuracy``, ``errors``, ``seconds``.
    """
    t_start = time.perf_counter()
    bundle = load_bundle(path)
    m = bundle.manifest
    sysinfo = machine_info()
    res = {"schema": VERIFY_SCHEMA, "schema_version": VERIFY_SCHEMA_VERSION, "ok": False,
           "bundle": bundle.path, "target": bundle.target_name, "model_file": bundle.model_file,
           "machine": sysinfo["machine"], "system": sysinfo, "runtime": None, "settings": None,
           "exact": bool(exact), "notes": [], "load_ms": None, "checks": [], "integrity": None,
           "test_vectors": None, "max_abs_diff": None, "vectors": None, "top1_agreement": None,
           "accuracy": None, "eval_samples": None,
           "manifest_accuracy": (m.get("metrics") or {}).get("accuracy"), "errors": [], "seconds": None}
    errors, checks = res["errors"], res["checks"]

    def finish():
        res["ok"] = not errors and all(c["ok"] or c["skipped"] for c in checks)
        res["seconds"] = time.perf_counter() - t_start
        return res

    # 1. integrity (a corrupt model file could crash the runtime, so stop here on failure)
    integ = bundle.check_integrity()
    res["integrity"] = integ
    if integ["ok"]:
        detail = "%d files, %d bytes, sha256 ok" % (integ["files_checked"], integ["bytes_checked"])
        if integ["unlisted"]:
            res["notes"].append("files not in the manifest (not verified): " + ", ".join(integ["unlisted"][:10]))
        checks.append(_check("integrity", True, detail))
    else:
        for p in integ["problems"]:
            errors.append("integrity: " + describe_problem(p))
        checks.append(_check("integrity", False, "; ".join(describe_problem(p) for p in integ["problems"][:5])))
        for name in ("load", "test_vectors", "accuracy"):
            checks.append(_check(name, False, "skipped: integrity check failed", skipped=True))
        return finish()

    # 1b. the transport payload (what a device downloads) must decode to the model file evaluated
    transport = _check_transport(bundle)
    if transport is not None:
        checks.append(transport)
        if not transport["ok"]:
            errors.append("transport: " + transport["detail"])

    # 2. load (RuntimeMissingError propagates: the environment, not the bundle, is at fault)
    rt = import_runtime(bundle.runtime_name, runtime)
    res["runtime"] = rt.as_dict()
    note = bundle.runtime_min_version_note(rt)
    if note:
        res["notes"].append(note)
    try:
        model = bundle.open_model(settings, runtime=rt.package)
    except ModelLoadError as e:
        errors.append("load: %s" % e)
        checks.append(_check("load", False, str(e)))
        for name in ("test_vectors", "accuracy"):
            checks.append(_check(name, False, "skipped: model did not load", skipped=True))
        return finish()
    res["settings"] = model.settings
    res["notes"].extend(model.notes)
    res["load_ms"] = model.load_seconds * 1e3
    checks.append(_check("load", True, "%s %s (%s) in %.1f ms" % (
        rt.package, rt.version, settings_id({k: v for k, v in model.settings.items() if k != "providers"}),
        res["load_ms"])))

    # 3. test vectors
    try:
        vectors = bundle.test_vectors()
    except ManifestError as e:
        vectors = None
        errors.append("test_vectors: %s" % e)
        checks.append(_check("test_vectors", False, str(e)))
    else:
        if vectors is None:
            errors.append("test_vectors: %s is missing from the bundle" % TEST_VECTORS_NAME)
            checks.append(_check("test_vectors", False, "%s missing" % TEST_VECTORS_NAME))
    if vectors is not None:
        try:
            tv = check_vectors(model, vectors, bundle.atol, exact=exact)
        except Exception as e:  # wrong input shape, runtime failure at invoke, ...: one line, named
            msg = " ".join(str(e).split())[:300] or type(e).__name__
            tv = {"ok": False, "error": "%s: %s" % (TEST_VECTORS_NAME, msg), "count": int(len(vectors["inputs"]))}
        res["test_vectors"] = tv
        res["vectors"] = tv.get("count")
        res["max_abs_diff"] = tv.get("max_abs_diff")
        res["top1_agreement"] = tv.get("top1_agreement")
        if tv.get("error"):
            errors.append("test_vectors: %s" % tv["error"])
            checks.append(_check("test_vectors", False, tv["error"]))
        elif tv["ok"]:
            checks.append(_check("test_vectors", True, "%d vectors, max|diff| %.3g %s; top-1 agreement %.4f" % (
                tv["count"], tv["max_abs_diff"], "bit-identical" if exact else "<= atol %g" % tv["atol"],
                tv["top1_agreement"])))
        else:
            what = "not bit-identical" if exact else "|diff| > atol %g" % tv["atol"]
            errors.append("test_vectors: %d of %d vectors %s, first at index %d (max|diff| %.3g at index %d)" % (
                tv["n_failed"], tv["count"], what, tv["failed_indices"][0], tv["max_abs_diff"],
                tv["worst_index"]))
            checks.append(_check("test_vectors", False, "%d/%d vectors failed: indices %s" % (
                tv["n_failed"], tv["count"], tv["failed_indices"])))

    # 4. accuracy on eval.npz
    if not check_accuracy:
        checks.append(_check("accuracy", True, "not requested", skipped=True))
        return finish()
    try:
        ev = bundle.eval_set()
    except ManifestError as e:
        errors.append("accuracy: %s" % e)
        checks.append(_check("accuracy", False, str(e)))
        return finish()
    if ev is None:
        res["notes"].append("%s not in the bundle: accuracy not measured" % EVAL_NAME)
        checks.append(_check("accuracy", True, "%s absent" % EVAL_NAME, skipped=True))
        return finish()
    try:
        acc = eval_accuracy(model, ev[0], ev[1])
    except Exception as e:  # bad raw shape, etc.: one line, named
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        errors.append("accuracy: %s: %s" % (EVAL_NAME, msg))
        checks.append(_check("accuracy", False, msg))
        return finish()
    res["accuracy"], res["eval_samples"] = acc["accuracy"], acc["eval_samples"]
    want = res["manifest_accuracy"]
    want_n = (m.get("metrics") or {}).get("eval_samples")
    tol = float((m.get("tolerance") or {}).get("accuracy", DEFAULT_ACCURACY_TOLERANCE))
    comparable = isinstance(want, (int, float)) and (want_n is None or int(want_n) == acc["eval_samples"])
    detail = "%.4f on %d samples" % (acc["accuracy"], acc["eval_samples"])
    if comparable:
        detail += " (manifest %.4f, tolerance %.3g)" % (want, tol)
        if acc["accuracy"] < float(want) - tol - 1e-12:
            errors.append("accuracy: %.4f on %s is below the manifest's %.4f by more than %.3g" % (
                acc["accuracy"], EVAL_NAME, want, tol))
            checks.append(_check("accuracy", False, detail))
            return finish()
    checks.append(_check("accuracy", True, detail))
    model.close()
    return finish()


def verify_exit_code(result):
    return 0 if result.get("ok") else IntegrityError.exit_code
