"""Per-machine runtime recommendations: ``recommended.json`` beside manifest.json.

``bench`` measures which runtime setting is fastest *on the machine it runs on*. That result is
kept per machine, never in the manifest: the manifest's ``runtime.recommended`` stays the
build-time default (a signed manifest is never changed by bench), and one machine's measurement
never narrows another's sweep or changes the settings another machine runs with (a Raspberry Pi
does not inherit the build machine's thread count; a desktop-gpu bundle benched on a CPU-only
machine keeps asking for TensorRT/CUDA elsewhere).

The file is advisory: it is not in the manifest's file table and not signed. It is validated
strictly when read; a malformed file is ignored with a note (the manifest default is used).

Schema (``edgec-recommended``, version 1)::

    {"schema": "edgec-recommended", "schema_version": 1, "runtime": "tflite" | "onnxruntime",
     "machines": {KEY: {"machine": IDENTITY, "settings": {...}, "p50_ms": float | null,
                        "measured_utc": "YYYY-MM-DDTHH:MM:SSZ", "settings_measured": int}}}

``IDENTITY`` is what bench records about the machine and runtime (``machine_identity``): CPU
architecture, OS, CPU model, board model, CPU count, usable CPUs, runtime package and version,
and for onnxruntime the execution providers that build offers. ``KEY`` is the first 16 hex
digits of the sha256 of its canonical JSON: a machine uses an entry only when everything in its
identity matches.
"""

import hashlib
import json
import math
import os
import tempfile
import time

from .errors import SettingsError
from .integrity import RECOMMENDED_NAME, FileRefused, open_bundle_file
from .machine import machine_info

RECOMMENDED_SCHEMA = "edgec-recommended"
RECOMMENDED_SCHEMA_VERSION = 1
MAX_BYTES = 1 << 20
MAX_MACHINES = 64
FILE_MODE = 0o644  # readable by whoever copies or verifies the bundle
_KEY_CHARS = set("0123456789abcdef")
_IDENTITY_KEYS = ("machine", "system", "cpu", "device_model", "cpu_count", "usable_cpus", "runtime",
                  "runtime_package", "runtime_version", "providers")


class RecommendationError(ValueError):
    """recommended.json is malformed (the message says where)."""


def machine_identity(runtime_info, sysinfo=None):
    """What identifies this machine + runtime for a recommendation (see the module doc)."""
    info = sysinfo or machine_info()
    ident = {
        "machine": info.get("machine"), "system": info.get("system"), "cpu": info.get("cpu"),
        "device_model": info.get("device_model"), "cpu_count": info.get("cpu_count"),
        "usable_cpus": info.get("usable_cpus"), "runtime": runtime_info.name,
        "runtime_package": runtime_info.package, "runtime_version": runtime_info.version, "providers": None,
    }
    if runtime_info.name == "onnxruntime":
        try:
            ident["providers"] = sorted(str(p) for p in runtime_info.module.get_available_providers())
        except Exception:
            ident["providers"] = None
    return ident


def machine_key(identity):
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _reject_constant(name):
    raise ValueError("%s is not allowed" % name)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_identity(ident, where):
    if not isinstance(ident, dict) or set(ident) != set(_IDENTITY_KEYS):
        raise RecommendationError("%s.machine should be an object with %s" % (where, ", ".join(_IDENTITY_KEYS)))
    for k, v in ident.items():
        if k in ("cpu_count", "usable_cpus"):
            ok = v is None or isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 20
        elif k == "providers":
            ok = v is None or isinstance(v, list) and len(v) <= 64 and all(isinstance(p, str) and len(p) <= 100
                                                                          for p in v)
        else:
            ok = v is None or isinstance(v, str) and len(v) <= 512
        if not ok:
            raise RecommendationError("%s.machine.%s has a bad value" % (where, k))


def parse_recommendations(raw, runtime_name):
    """recommended.json bytes -> ``{key: entry}`` with settings normalized; RecommendationError
    naming what is wrong otherwise."""
    from .runtimes import normalize_settings
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RecommendationError("not valid JSON (%s)" % (str(e).splitlines() or ["?"])[0][:100]) from None
    if not isinstance(data, dict):
        raise RecommendationError("not a JSON object")
    if data.get("schema") != RECOMMENDED_SCHEMA:
        raise RecommendationError("schema is %r, not %r" % (str(data.get("schema"))[:40], RECOMMENDED_SCHEMA))
    sv = data.get("schema_version")
    if sv != RECOMMENDED_SCHEMA_VERSION or isinstance(sv, bool):
        raise RecommendationError("schema_version %r is not %d" % (sv, RECOMMENDED_SCHEMA_VERSION))
    if data.get("runtime") != runtime_name:
        raise RecommendationError("it is for runtime %r, the bundle's is %r" % (str(data.get("runtime"))[:40],
                                                                               runtime_name))
    machines = data.get("machines")
    if not isinstance(machines, dict) or len(machines) > MAX_MACHINES:
        raise RecommendationError("machines should be an object of at most %d entries" % MAX_MACHINES)
    out = {}
    for key, entry in machines.items():
        where = "machines[%r]" % key[:20]
        if len(key) != 16 or not set(key) <= _KEY_CHARS:
            raise RecommendationError("%s: a key is 16 hex digits" % where)
        if not isinstance(entry, dict):
            raise RecommendationError("%s should be an object" % where)
        _check_identity(entry.get("machine"), where)
        if machine_key(entry["machine"]) != key:
            raise RecommendationError("%s does not match its machine" % where)
        settings = entry.get("settings")
        if not isinstance(settings, dict) or not settings:
            raise RecommendationError("%s.settings should be an object" % where)
        try:
            norm = normalize_settings(runtime_name, settings, strict=True)
        except SettingsError as e:
            raise RecommendationError("%s.settings: %s" % (where, e.message)) from None
        p50 = entry.get("p50_ms")
        if p50 is not None and not (_is_num(p50) and p50 >= 0):
            raise RecommendationError("%s.p50_ms should be a number" % where)
        when = entry.get("measured_utc")
        if when is not None and not (isinstance(when, str) and len(when) <= 40):
            raise RecommendationError("%s.measured_utc should be a time" % where)
        n = entry.get("settings_measured")
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise RecommendationError("%s.settings_measured should be a count" % where)
        out[key] = dict(entry, settings=norm)
    return out


def read_recommendations(bundle_path, runtime_name):
    """``(entries, notes)``: recommended.json's entries, or {} with a note when it is malformed
    (no note when there is no file)."""
    try:
        f, _size = open_bundle_file(bundle_path, RECOMMENDED_NAME, MAX_BYTES, "recommendations")
    except FileNotFoundError:
        return {}, []
    except FileRefused as e:
        why = {"too-big": "bigger than %d bytes" % MAX_BYTES, "symlink": "a symlink"}.get(e.problem,
                                                                                        "not a regular file")
        return {}, [_ignored(why)]
    except OSError as e:
        return {}, [_ignored("unreadable: %s" % (e.strerror or e))]
    with f:
        raw = f.read(MAX_BYTES + 1)
    try:
        return parse_recommendations(raw, runtime_name), []
    except RecommendationError as e:
        return {}, [_ignored(str(e))]


def _ignored(why):
    return ("%s ignored: %s; using the manifest's runtime.recommended (hint: delete the file, or run bench "
            "again to rewrite it)" % (RECOMMENDED_NAME, why))


def machine_recommendation(bundle_path, runtime_name, runtime_info, sysinfo=None):
    """``(settings, notes)``: recommended.json's settings for this machine and runtime ({} when there
    are none or the file is malformed)."""
    entries, notes = read_recommendations(bundle_path, runtime_name)
    if not entries:
        return {}, notes
    entry = entries.get(machine_key(machine_identity(runtime_info, sysinfo)))
    if entry is None:
        return {}, notes
    from .runtimes import settings_id
    when = entry.get("measured_utc")
    notes.append("using this machine's setting from %s (%s%s)" % (
        RECOMMENDED_NAME, settings_id(entry["settings"]), ", measured %s" % when if when else ""))
    return dict(entry["settings"]), notes


def store_recommendation(bundle_path, runtime_name, identity, settings, p50_ms=None, settings_measured=None):
    """Record ``settings`` as the best for the machine ``identity`` in recommended.json (other
    machines' entries kept; a malformed file is replaced). Written atomically, mode 0644.
    Returns ``(key, notes)``; raises OSError when the bundle folder is not writable."""
    from .runtimes import normalize_settings
    key = machine_key(identity)
    entries, notes = read_recommendations(bundle_path, runtime_name)
    norm = normalize_settings(runtime_name, settings, strict=True)
    entries[key] = {"machine": dict(identity), "settings": norm,
                    "p50_ms": float(p50_ms) if _is_num(p50_ms) else None,
                    "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "settings_measured": settings_measured}
    if len(entries) > MAX_MACHINES:  # keep the newest
        keep = sorted(entries, key=lambda k: str(entries[k].get("measured_utc") or ""))[-MAX_MACHINES:]
        entries = {k: entries[k] for k in keep}
    doc = {"schema": RECOMMENDED_SCHEMA, "schema_version": RECOMMENDED_SCHEMA_VERSION, "runtime": runtime_name,
           "machines": entries}
    write_file_atomic(os.path.join(bundle_path, RECOMMENDED_NAME),
                      (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return key, notes


def write_file_atomic(path, data, mode=FILE_MODE):
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, with
    ``mode`` (never the 0600 that mkstemp creates)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
        if not hasattr(os, "fchmod"):
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
