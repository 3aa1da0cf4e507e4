"""File integrity: every file the manifest lists must exist with its byte count and sha256."""

import hashlib
import os

from .errors import IntegrityError, ManifestError

_CHUNK = 1 << 20
# Created by Python when run.py is executed; never part of a bundle's file table.
_IGNORED_DIRS = {"__pycache__"}
_IGNORED_SUFFIXES = (".pyc", ".pyo")


def sha256_file(path):
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def safe_join(root, name):
    """Join a manifest file name to the bundle root, refusing absolute paths and '..'."""
    if not isinstance(name, str) or not name:
        raise ManifestError(
            "manifest.json: a files[] entry has no name",
            "re-export the bundle with edgec export",
        )
    norm = name.replace("\\", "/")
    parts = norm.split("/")
    if norm.startswith("/") or ".." in parts or (len(parts[0]) == 2 and parts[0][1] == ":"):
        raise ManifestError(
            "manifest.json: file name %r points outside the bundle" % name,
            "file names must be relative paths inside the bundle; re-export the bundle",
        )
    return os.path.join(root, *[p for p in parts if p not in ("", ".")])


def describe_files(root, names):
    """The manifest ``files`` table for ``names`` (relative paths under ``root``):
    ``[{"name", "bytes", "sha256"}]``. The exporter can use this so that host and
    device hash files the same way."""
    table = []
    for name in names:
        path = safe_join(root, name)
        table.append({"name": name.replace("\\", "/"), "bytes": os.path.getsize(path),
                      "sha256": sha256_file(path)})
    return table


def list_bundle_files(root):
    """All regular files under ``root`` as '/'-separated relative names (caches skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED_DIRS)
        for fn in sorted(filenames):
            if fn.endswith(_IGNORED_SUFFIXES):
                continue
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            out.append(rel.replace(os.sep, "/"))
    return out


def check_files(root, files, manifest_name="manifest.json"):
    """Check every ``files`` entry. Returns a dict:

    ``{"ok", "files_checked", "bytes_checked", "problems": [{"file", "problem", "expected", "actual"}],
    "unlisted": [names present in the bundle but not in the table]}``

    ``problem`` is one of ``missing``, ``size``, ``sha256``, ``not-a-file``. Size and
    sha256 are both checked (a size mismatch is reported as ``size``; equal sizes with
    different content as ``sha256``), so one flipped byte anywhere is caught.
    """
    problems = []
    listed = set()
    nbytes = 0
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ManifestError(
                "manifest.json: files[%d] is not an object with name/bytes/sha256" % i,
                "re-export the bundle with edgec export",
            )
        name = entry["name"]
        path = safe_join(root, name)
        listed.add(name.replace("\\", "/"))
        if not os.path.exists(path):
            problems.append({"file": name, "problem": "missing", "expected": entry.get("bytes"),
                             "actual": None})
            continue
        if not os.path.isfile(path):
            problems.append({"file": name, "problem": "not-a-file", "expected": "file",
                             "actual": "directory" if os.path.isdir(path) else "other"})
            continue
        size = os.path.getsize(path)
        nbytes += size
        if entry.get("bytes") is not None and int(entry["bytes"]) != size:
            problems.append({"file": name, "problem": "size", "expected": int(entry["bytes"]),
                             "actual": size})
            continue
        want = str(entry.get("sha256", "")).lower()
        got = sha256_file(path)
        if want != got:
            problems.append({"file": name, "problem": "sha256", "expected": want, "actual": got})
    unlisted = [n for n in list_bundle_files(root) if n not in listed and n != manifest_name]
    return {"ok": not problems, "files_checked": len(files), "bytes_checked": nbytes,
            "problems": problems, "unlisted": unlisted}


def describe_problem(p):
    """One-line description of one ``check_files`` problem."""
    if p["problem"] == "missing":
        return "%s is missing" % p["file"]
    if p["problem"] == "size":
        return "%s has %s bytes, manifest says %s" % (p["file"], p["actual"], p["expected"])
    if p["problem"] == "sha256":
        return "%s sha256 mismatch (got %s..., manifest %s...)" % (
            p["file"], str(p["actual"])[:12], str(p["expected"])[:12])
    return "%s is not a regular file" % p["file"]


def require_intact(root, files):
    """Raise IntegrityError naming the first bad file (and counting the rest)."""
    report = check_files(root, files)
    if not report["ok"]:
        probs = report["problems"]
        msg = describe_problem(probs[0])
        if len(probs) > 1:
            msg += " (and %d more: %s)" % (len(probs) - 1, ", ".join(p["file"] for p in probs[1:6]))
        raise IntegrityError("bundle integrity check failed: " + msg,
                             "the bundle was corrupted or edited after export; copy it again",
                             problems=probs)
    return report
