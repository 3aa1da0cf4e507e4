"""verify: integrity + load + test-vector reproduction + accuracy, as one result dict."""

import os
import time

from .errors import ManifestError, ModelLoadError
from .evaluate import accuracy as eval_accuracy
from .evaluate import check_vectors
from .integrity import summarize_problems
from .machine import machine_info
from .manifest import EVAL_NAME, TEST_VECTORS_NAME, bundle_root, load_bundle, read_manifest_bytes
from .runtimes import import_runtime, settings_id

VERIFY_SCHEMA = "edgec-verify"
VERIFY_SCHEMA_VERSION = 1
DEFAULT_ACCURACY_TOLERANCE = 0.01


def _check(name, ok, detail, skipped=False):
    return {"name": name, "ok": bool(ok), "skipped": bool(skipped), "detail": detail}


def _check_transport(bundle):
    """Decode ``size.transport_file`` (``transport.py``) and compare it byte for byte with the model file.

    Both are read bounded: the payload by the size its file-table entry records, the decoded file by
    the size of the model file it must equal (nothing bigger is ever allocated)."""
    import hashlib

    from .integrity import FileRefused, _hash_open_file, open_bundle_file, read_bundle_file
    from .transport import MAX_OUTPUT, TransportError, decode

    m = bundle.manifest
    name = (m.get("size") or {}).get("transport_file")
    if not name:
        return None
    listed = {f.get("name"): f for f in m.get("files") or [] if isinstance(f, dict)}
    limit = listed[name]["bytes"] if name in listed else MAX_OUTPUT
    try:
        f, model_size = open_bundle_file(bundle.path, m["model_file"], what="model_file")
        with f:
            model_sha, _n = _hash_open_file(f, model_size)
        payload = read_bundle_file(bundle.path, name, limit, "size.transport_file")
        decoded = decode(payload, max_size=model_size)
    except FileRefused as e:
        return _check("transport", False, "%s cannot be read: %s" % (e.name, e.problem))
    except (OSError, TransportError) as e:
        return _check("transport", False, "%s does not decode (%s)" % (name, e))
    if len(decoded) != model_size or hashlib.sha256(decoded).hexdigest() != model_sha:
        return _check("transport", False, "%s does not decode to %s" % (name, m["model_file"]))
    return _check("transport", True, "%s (%d bytes) decodes to %s exactly" % (name, len(payload), m["model_file"]))


def _signed_note(bundle):
    """A note for a signed bundle verified without --public-key."""
    from .signature import read_signature
    try:
        sig = read_signature(bundle.path)
    except ValueError as e:
        return "%s (the signature was not checked)" % e
    if sig is None:
        return None
    return ("the bundle is signed (key %s...); pass --public-key KEY to check the signature"
            % sig["public_key_fingerprint"][:23])


def _ran_settings_id(settings):
    """The settings the model runs with: for ONNX the provider the session uses (``providers``, from
    session.get_providers()), with the requested one named when it fell back."""
    shown = {k: v for k, v in settings.items() if k != "providers"}
    ran = settings.get("providers") or []
    if ran and shown.get("provider") not in (None, ran[0]):
        requested = str(shown["provider"]).replace("ExecutionProvider", "")
        shown["provider"] = ran[0]
        return "%s, %s requested" % (settings_id(shown), requested)
    return settings_id(shown)


def verify_bundle(path, exact=False, runtime=None, settings=None, check_accuracy=True, public_key=None, task=None):
    """Verify a bundle on this machine.

    Raises BundleError subclasses when the bundle cannot be verified at all (not a bundle,
    bad manifest, schema too new, runtime missing, an unreadable public key, cryptography
    missing for ``public_key``). Check failures do not raise; they make ``result["ok"]`` False
    and are listed in ``result["errors"]`` (one line each, naming the file or vector index).

    ``public_key``: path of an Ed25519 public key; the bundle must then carry a manifest.sig made
    with its private key over the exact bytes of manifest.json (checked first: nothing in an
    unsigned or tampered manifest is trusted), and then every file must match the signed file
    table, with no file added.

    Result fields: ``schema`` ("edgec-verify"), ``schema_version``, ``ok``, ``bundle``,
    ``target``, ``model_file``, ``machine`` (platform.machine()), ``system`` (machine_info()),
    ``runtime`` ({name, package, version}), ``settings``, ``notes``, ``load_ms``,
    ``checks`` ([{name, ok, skipped, detail}] for signature (with ``public_key``), integrity,
    transport (when the bundle has a transport payload), load, test_vectors, accuracy),
    ``signature`` (signature.check_signature result, or None), ``integrity`` (integrity.check_files
    report), ``test_vectors`` (evaluate.compare_outputs result), ``max_abs_diff``, ``vectors``,
    ``top1_agreement``, ``accuracy``, ``eval_samples``, ``manifest_accuracy``, ``errors``, ``seconds``;
    for a multi-task bundle also ``tasks`` ({name: {accuracy, eval_samples, manifest_accuracy}}), with
    ``accuracy`` their mean, and ``task <name>: ...`` checks (``task``: check that task only).
    """
    t_start = time.perf_counter()
    sysinfo = machine_info()
    res = {"schema": VERIFY_SCHEMA, "schema_version": VERIFY_SCHEMA_VERSION, "ok": False,
           "bundle": os.path.abspath(bundle_root(path)), "target": None, "model_file": None,
           "machine": sysinfo["machine"], "system": sysinfo, "runtime": None, "settings": None,
           "exact": bool(exact), "notes": [], "load_ms": None, "checks": [], "signature": None, "integrity": None,
           "test_vectors": None, "max_abs_diff": None, "vectors": None, "top1_agreement": None,
           "accuracy": None, "eval_samples": None, "manifest_accuracy": None, "errors": [], "seconds": None}
    errors, checks = res["errors"], res["checks"]

    def finish():
        res["ok"] = not errors and all(c["ok"] or c["skipped"] for c in checks)
        res["seconds"] = time.perf_counter() - t_start
        return res

    # 0. signature (before the manifest is parsed: an unsigned or changed manifest is not trusted)
    raw = None
    if public_key is not None:
        from .signature import check_signature
        raw = read_manifest_bytes(path)
        sig = check_signature(raw, res["bundle"], public_key)
        res["signature"] = sig
        checks.append(_check("signature", sig["ok"], sig["detail"]))
        if not sig["ok"]:
            errors.append("signature: " + sig["detail"])
            for name in ("integrity", "load", "test_vectors", "accuracy"):
                checks.append(_check(name, False, "skipped: signature check failed", skipped=True))
            return finish()
    bundle = load_bundle(path, manifest_bytes=raw)
    m = bundle.manifest
    res.update({"bundle": bundle.path, "target": bundle.target_name, "model_file": bundle.model_file,
                "manifest_accuracy": (m.get("metrics") or {}).get("accuracy")})
    if public_key is None:
        note = _signed_note(bundle)
        if note:
            res["notes"].append(note)

    # 1. integrity (a corrupt model file could crash the runtime, so stop here on failure)
    integ = bundle.check_integrity()
    res["integrity"] = integ
    if integ["ok"]:
        detail = "%d files, %d bytes, sha256 ok, no other files" % (integ["files_checked"], integ["bytes_checked"])
        checks.append(_check("integrity", True, detail))
    else:
        lines = summarize_problems(integ)
        errors.extend("integrity: " + line for line in lines)
        checks.append(_check("integrity", False, "; ".join(lines)))
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
        rt.package, rt.version, _ran_settings_id(model.settings), res["load_ms"])))

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
            agreement = "; top-1 agreement %.4f" % tv["top1_agreement"] if bundle.task == "classification" else ""
            checks.append(_check("test_vectors", True, "%d vectors, max|diff| %.3g %s%s" % (
                tv["count"], tv["max_abs_diff"], "bit-identical" if exact else "<= atol %g" % tv["atol"], agreement)))
        else:
            what = "not bit-identical" if exact else "|diff| > atol %g" % tv["atol"]
            errors.append("test_vectors: %d of %d vectors %s, first at index %d (max|diff| %.3g at index %d)" % (
                tv["n_failed"], tv["count"], what, tv["failed_indices"][0], tv["max_abs_diff"],
                tv["worst_index"]))
            checks.append(_check("test_vectors", False, "%d/%d vectors failed: indices %s" % (
                tv["n_failed"], tv["count"], tv["failed_indices"])))

    # 3b. a multi-task bundle (learn stages): each task's model, test vectors, accuracy (``tasks.py``);
    # ``task`` checks that task only
    from .tasks import bundle_tasks, select_task, verify_tasks
    if task is not None or bundle_tasks(m):
        select_task(bundle, task) if task is not None else None
        t_checks, t_errors, per_task = verify_tasks(bundle, settings, rt.package, exact, check_accuracy, task)
        checks.extend(t_checks)
        errors.extend(t_errors)
        res["tasks"] = per_task
        if per_task:
            res["accuracy"] = sum(v["accuracy"] for v in per_task.values()) / len(per_task)
            res["eval_samples"] = sum(v["eval_samples"] for v in per_task.values())
        model.close()
        return finish()

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
    if bundle.task != "classification":  # regression / reconstruction: the task's figures (metrics.py)
        _verify_quality(bundle, model, ev, res, errors, checks)
        model.close()
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
    tol = (m.get("tolerance") or {}).get("accuracy")
    tol = float(DEFAULT_ACCURACY_TOLERANCE if tol is None else tol)
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


def _verify_quality(bundle, model, ev, res, errors, checks):
    """The ``quality`` check of a regression / reconstruction bundle: its headline figure on eval.npz
    (R^2; ROC AUC, or MSE when no sample is marked anomalous) against the manifest's ``eval_<figure>``,
    within ``tolerance.metric`` (absolute; relative for MSE). Sets ``res["task"]`` and ``res["quality"]``."""
    from .evaluate import task_quality
    from .metrics import within_tolerance

    m = bundle.manifest
    res["task"] = bundle.task
    try:
        q = task_quality(model, ev[0], ev[1], bundle.task, m.get("postprocessing"))
    except Exception as e:  # bad raw shape, etc.: one line, named
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        errors.append("quality: %s: %s" % (EVAL_NAME, msg))
        checks.append(_check("quality", False, msg))
        return
    metrics = m.get("metrics") or {}
    want = metrics.get("eval_" + q["metric"]) if q["metric"] else None
    tol = (m.get("tolerance") or {}).get("metric")
    tol = float(DEFAULT_ACCURACY_TOLERANCE if tol is None else tol)
    q["manifest_value"] = want
    res["quality"], res["eval_samples"] = q, q["eval_samples"]
    shown = "-" if q["value"] is None else "%.4f" % q["value"]
    detail = "%s %s on %d samples" % (q["metric"], shown, q["eval_samples"])
    if isinstance(want, (int, float)):
        detail += " (manifest %.4f, tolerance %.3g%s)" % (want, tol, "" if q["higher_is_better"] else " relative")
        if not within_tolerance(q["value"], want, q["higher_is_better"], tol):
            errors.append("quality: %s %s on %s is %s than the manifest's %.4f by more than %.3g%s" % (
                q["metric"], shown, EVAL_NAME, "lower" if q["higher_is_better"] else "higher", want, tol,
                "" if q["higher_is_better"] else " (relative)"))
            checks.append(_check("quality", False, detail))
            return
    checks.append(_check("quality", True, detail))
