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
    _run_checks(res, path, exact, runtime, settings, check_accuracy, public_key, task)
    res["ok"] = not res["errors"] and all(c["ok"] or c["skipped"] for c in res["checks"])
    res["seconds"] = time.perf_counter() - t_start
    return res


def _run_checks(res, path, exact, runtime, settings, check_accuracy, public_key, task):
    """The checks in order, each into ``res``; a check the later ones depend on stops them when it fails
    (they are listed as skipped)."""
    raw = None
    if public_key is not None:
        raw = read_manifest_bytes(path)
        if not _signature_ok(res, raw, public_key):
            return
    bundle = load_bundle(path, manifest_bytes=raw)
    res.update({"bundle": bundle.path, "target": bundle.target_name, "model_file": bundle.model_file,
                "manifest_accuracy": (bundle.manifest.get("metrics") or {}).get("accuracy")})
    if public_key is None:
        note = _signed_note(bundle)
        if note:
            res["notes"].append(note)
    if not _integrity_ok(res, bundle):  # a corrupt model file could crash the runtime: stop here
        return
    transport = _check_transport(bundle)  # what a device downloads must decode to the model file evaluated
    if transport is not None:
        _record(res, transport)
    rt = import_runtime(bundle.runtime_name, runtime)  # RuntimeMissingError: the environment is at fault
    res["runtime"] = rt.as_dict()
    note = bundle.runtime_min_version_note(rt)
    if note:
        res["notes"].append(note)
    model = _load(res, bundle, settings, rt)
    if model is None:
        return
    from .tasks import bundle_tasks  # lazily: tasks.py requires lzma, a single-task bundle does not
    try:
        _check_test_vectors(res, bundle, model, exact)
        if task is not None or bundle_tasks(bundle.manifest):
            _check_tasks(res, bundle, settings, rt, exact, check_accuracy, task)
        elif not check_accuracy:
            res["checks"].append(_check("accuracy", True, "not requested", skipped=True))
        else:
            _check_eval_set(res, bundle, model)
    finally:
        model.close()


def _record(res, check):
    """Add ``check`` to ``res``; a failed one is also an error line, ``<name>: <detail>``."""
    res["checks"].append(check)
    if not check["ok"] and not check["skipped"]:
        res["errors"].append("%s: %s" % (check["name"], check["detail"]))


def _skip(res, names, why):
    for name in names:
        res["checks"].append(_check(name, False, "skipped: " + why, skipped=True))


def _signature_ok(res, raw, public_key):
    """The signature, before the manifest is parsed: an unsigned or changed manifest is not trusted."""
    from .signature import check_signature
    sig = check_signature(raw, res["bundle"], public_key)
    res["signature"] = sig
    _record(res, _check("signature", sig["ok"], sig["detail"]))
    if not sig["ok"]:
        _skip(res, ("integrity", "load", "test_vectors", "accuracy"), "signature check failed")
    return sig["ok"]


def _integrity_ok(res, bundle):
    integ = bundle.check_integrity()
    res["integrity"] = integ
    if integ["ok"]:
        detail = "%d files, %d bytes, sha256 ok, no other files" % (integ["files_checked"], integ["bytes_checked"])
        res["checks"].append(_check("integrity", True, detail))
        return True
    lines = summarize_problems(integ)
    res["errors"].extend("integrity: " + line for line in lines)
    res["checks"].append(_check("integrity", False, "; ".join(lines)))
    _skip(res, ("load", "test_vectors", "accuracy"), "integrity check failed")
    return False


def _load(res, bundle, settings, rt):
    """The opened model, or None (the load check failed)."""
    try:
        model = bundle.open_model(settings, runtime=rt.package)
    except ModelLoadError as e:
        _record(res, _check("load", False, str(e)))
        _skip(res, ("test_vectors", "accuracy"), "model did not load")
        return None
    res["settings"] = model.settings
    res["notes"].extend(model.notes)
    res["load_ms"] = model.load_seconds * 1e3
    res["checks"].append(_check("load", True, "%s %s (%s) in %.1f ms" % (
        rt.package, rt.version, _ran_settings_id(model.settings), res["load_ms"])))
    return model


def _check_test_vectors(res, bundle, model, exact):
    try:
        vectors = bundle.test_vectors()
    except ManifestError as e:
        _record(res, _check("test_vectors", False, str(e)))
        return
    if vectors is None:
        res["errors"].append("test_vectors: %s is missing from the bundle" % TEST_VECTORS_NAME)
        res["checks"].append(_check("test_vectors", False, "%s missing" % TEST_VECTORS_NAME))
        return
    try:
        tv = check_vectors(model, vectors, bundle.atol_for(model.runtime.package), exact=exact)
        tv["atol_runtime"] = model.runtime.package
    except Exception as e:  # wrong input shape, runtime failure at invoke, ...: one line, named
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        tv = {"ok": False, "error": "%s: %s" % (TEST_VECTORS_NAME, msg), "count": int(len(vectors["inputs"]))}
    res["test_vectors"] = tv
    res["vectors"] = tv.get("count")
    res["max_abs_diff"] = tv.get("max_abs_diff")
    res["top1_agreement"] = tv.get("top1_agreement")
    if tv.get("error"):
        _record(res, _check("test_vectors", False, tv["error"]))
    elif tv["ok"]:
        agreement = "; top-1 agreement %.4f" % tv["top1_agreement"] if bundle.task == "classification" else ""
        res["checks"].append(_check("test_vectors", True, "%d vectors, max|diff| %.3g %s%s" % (
            tv["count"], tv["max_abs_diff"], "bit-identical" if exact else "<= atol %g" % tv["atol"], agreement)))
    else:
        what = "not bit-identical" if exact else "|diff| > atol %g" % tv["atol"]
        res["errors"].append("test_vectors: %d of %d vectors %s, first at index %d (max|diff| %.3g at index %d)" % (
            tv["n_failed"], tv["count"], what, tv["failed_indices"][0], tv["max_abs_diff"], tv["worst_index"]))
        res["checks"].append(_check("test_vectors", False, "%d/%d vectors failed: indices %s" % (
            tv["n_failed"], tv["count"], tv["failed_indices"])))


def _check_tasks(res, bundle, settings, rt, exact, check_accuracy, task):
    """A multi-task bundle (learn stages): each task's model, test vectors, accuracy (``tasks.py``);
    ``task``: that task only."""
    from .tasks import select_task, verify_tasks
    if task is not None:
        select_task(bundle, task)
    t_checks, t_errors, per_task = verify_tasks(bundle, settings, rt.package, exact, check_accuracy, task)
    res["checks"].extend(t_checks)
    res["errors"].extend(t_errors)
    res["tasks"] = per_task
    if per_task:
        res["accuracy"] = sum(v["accuracy"] for v in per_task.values()) / len(per_task)
        res["eval_samples"] = sum(v["eval_samples"] for v in per_task.values())


def _check_eval_set(res, bundle, model):
    """Accuracy (or a regression / reconstruction bundle's quality) on eval.npz."""
    try:
        ev = bundle.eval_set()
    except ManifestError as e:
        _record(res, _check("accuracy", False, str(e)))
        return
    if ev is None:
        res["notes"].append("%s not in the bundle: accuracy not measured" % EVAL_NAME)
        res["checks"].append(_check("accuracy", True, "%s absent" % EVAL_NAME, skipped=True))
        return
    if bundle.task != "classification":  # regression / reconstruction: the task's figures (metrics.py)
        _verify_quality(bundle, model, ev, res, res["errors"], res["checks"])
        return
    try:
        acc = eval_accuracy(model, ev[0], ev[1])
    except Exception as e:  # bad raw shape, etc.: one line, named
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        res["errors"].append("accuracy: %s: %s" % (EVAL_NAME, msg))
        res["checks"].append(_check("accuracy", False, msg))
        return
    m = bundle.manifest
    res["accuracy"], res["eval_samples"] = acc["accuracy"], acc["eval_samples"]
    want = res["manifest_accuracy"]
    want_n = (m.get("metrics") or {}).get("eval_samples")
    tol = (m.get("tolerance") or {}).get("accuracy")
    tol = float(DEFAULT_ACCURACY_TOLERANCE if tol is None else tol)
    comparable = isinstance(want, (int, float)) and (want_n is None or int(want_n) == acc["eval_samples"])
    detail = "%.4f on %d samples" % (acc["accuracy"], acc["eval_samples"])
    ok = True
    if comparable:
        detail += " (manifest %.4f, tolerance %.3g)" % (want, tol)
        if acc["accuracy"] < float(want) - tol - 1e-12:
            res["errors"].append("accuracy: %.4f on %s is below the manifest's %.4f by more than %.3g" % (
                acc["accuracy"], EVAL_NAME, want, tol))
            ok = False
    res["checks"].append(_check("accuracy", ok, detail))


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
