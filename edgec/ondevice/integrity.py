"""File integrity and safe file access inside a bundle.

A bundle is a folder of regular files, every one listed in the manifest's file table with its
byte count and sha256. Names taken from manifest.json are confined to the bundle: relative,
'/'-separated, no '..', no empty or '.' parts, no backslash, colon or control characters. Files
are opened without following symlinks and must be regular files (never a device, FIFO or
socket); a symlink anywhere in the bundle is refused, and so is any file the table does not list,
except:

* ``manifest.json`` (it cannot list itself), ``manifest.sig`` (its signature, see
  ``signature.py``) and ``recommended.json`` (per-machine runtime settings written by bench,
  advisory, validated when read), all at the top level;
* ``*.pyc`` files directly inside ``__pycache__`` folders (Python writes them; ``run.py`` never
  reads them, see ``run_bundle.py``).

Reads are bounded: a file bigger than the size the manifest records is refused before it is read.
"""

import errno
import hashlib
import os
import stat

from .errors import IntegrityError, ManifestError

_CHUNK = 1 << 20
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RECOMMENDED_NAME = "recommended.json"
# Top-level files that the file table does not (and must not) list.
UNLISTED_OK = (MANIFEST_NAME, SIGNATURE_NAME, RECOMMENDED_NAME)
PYCACHE = "__pycache__"
_PYC_SUFFIXES = (".pyc",)
MAX_NAME_CHARS = 1024
MAX_PART_CHARS = 255
_REEXPORT = "re-export the bundle with edgec export"


class FileRefused(Exception):
    """A bundle path that is not a plain regular file: ``problem`` is symlink | not-a-file | too-big."""

    def __init__(self, name, problem, detail=None):
        super().__init__("%s: %s" % (name, problem))
        self.name, self.problem, self.detail = name, problem, detail


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


def check_name(name, what="a files[] entry"):
    """A manifest file name, checked: returns it '/'-separated; ManifestError when it could point
    outside the bundle or is not a plain relative path."""
    if not isinstance(name, str) or not name:
        raise ManifestError("manifest.json: %s has no file name" % what, _REEXPORT)
    shown = repr(name[:80])
    if len(name) > MAX_NAME_CHARS:
        raise ManifestError("manifest.json: %s names a file of %d characters (at most %d)"
                            % (what, len(name), MAX_NAME_CHARS), _REEXPORT)
    if name.startswith("/") or "\\" in name or ":" in name or (len(name) >= 2 and name[1] == ":"):
        raise ManifestError("manifest.json: file name %s (%s) points outside the bundle" % (shown, what),
                            "file names must be relative paths inside the bundle; re-export the bundle")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ManifestError("manifest.json: file name %s (%s) contains control characters" % (shown, what),
                            _REEXPORT)
    parts = name.split("/")
    if ".." in parts:
        raise ManifestError("manifest.json: file name %s (%s) points outside the bundle" % (shown, what),
                            "file names must be relative paths inside the bundle; re-export the bundle")
    if any(p in ("", ".") or len(p) > MAX_PART_CHARS for p in parts):
        raise ManifestError("manifest.json: file name %s (%s) is not a plain relative path" % (shown, what),
                            "use names like model.tflite or edgec_ondevice/cli.py; re-export the bundle")
    return name


def safe_join(root, name, what="a files[] entry"):
    """Join a manifest file name to the bundle root (``check_name`` first)."""
    return os.path.join(root, *check_name(name, what).split("/"))


def _lstat_path(root, name):
    """lstat every component of ``name`` under ``root``: FileRefused on a symlink or a non-folder
    in the middle, FileNotFoundError when missing; returns the final path."""
    path = root
    parts = name.split("/")
    for i, part in enumerate(parts):
        path = os.path.join(path, part)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise FileRefused(name, "symlink", "/".join(parts[:i + 1]))
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise FileRefused(name, "not-a-file", "/".join(parts[:i + 1]))
        if i == len(parts) - 1 and not stat.S_ISREG(st.st_mode):  # never open a device, FIFO or socket
            raise FileRefused(name, "not-a-file", name)
    return path


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def open_bundle_file(root, name, max_bytes=None, what="a files[] entry"):
    """Open ``root/name`` for reading: the name confined to the bundle, no symlink on its path, a
    regular file of at most ``max_bytes``. Returns ``(binary file object, size)``.

    Raises ManifestError (bad name), FileNotFoundError, FileRefused (symlink | not-a-file | too-big)."""
    check_name(name, what)
    path = _lstat_path(root, name)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        if getattr(os, "O_NOFOLLOW", 0) and e.errno == errno.ELOOP:  # replaced by a symlink meanwhile
            raise FileRefused(name, "symlink", name) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(name, "not-a-file", name)
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileRefused(name, "too-big", (st.st_size, max_bytes))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_bundle_file(root, name, max_bytes, what="a files[] entry"):
    """The bytes of ``root/name`` (see ``open_bundle_file``), never more than ``max_bytes``."""
    f, size = open_bundle_file(root, name, max_bytes, what)
    with f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after the size check
        raise FileRefused(name, "too-big", (len(data), max_bytes))
    return data


def _hash_open_file(f, limit):
    """sha256 and length of at most ``limit`` + 1 bytes of ``f``."""
    h = hashlib.sha256()
    n = 0
    while n <= limit:
        block = f.read(min(_CHUNK, limit + 1 - n))
        if not block:
            break
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def describe_files(root, names):
    """The manifest ``files`` table for ``names`` (relative paths under ``root``):
    ``[{"name", "bytes", "sha256"}]``. The exporter uses this so that host and device hash files
    the same way; every name must be a regular file (no symlink)."""
    table = []
    for name in names:
        name = name.replace("\\", "/")
        f, size = open_bundle_file(root, name)
        with f:
            digest, n = _hash_open_file(f, size)
        table.append({"name": name, "bytes": n, "sha256": digest})
    return table


def is_ignored_unlisted(rel):
    """True for the files a bundle may hold without listing them (see the module doc)."""
    parts = rel.split("/")
    if len(parts) == 1 and parts[0] in UNLISTED_OK:
        return True
    return len(parts) >= 2 and parts[-2] == PYCACHE and parts[-1].endswith(_PYC_SUFFIXES)


def scan_bundle(root):
    """Walk ``root`` without following symlinks. Returns ``{"files": [regular files], "symlinks": [...],
    "special": [devices, FIFOs, sockets]}``, '/'-separated relative names, sorted."""
    files, links, special = [], [], []

    def rel(p):
        return os.path.relpath(p, root).replace(os.sep, "/")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        keep = []
        for d in sorted(dirnames):
            p = os.path.join(dirpath, d)
            if os.path.islink(p):
                links.append(rel(p))
            else:
                keep.append(d)
        dirnames[:] = keep
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                links.append(rel(p))
            elif stat.S_ISREG(st.st_mode):
                files.append(rel(p))
            else:
                special.append(rel(p))
    return {"files": sorted(files), "symlinks": sorted(links), "special": sorted(special)}


def check_files(root, files, manifest_name=MANIFEST_NAME):
    """Check every ``files`` entry and the folder as a whole. Returns a dict:

    ``{"ok", "files_checked", "bytes_checked", "problems": [{"file", "problem", "expected", "actual"}],
    "unlisted": [names present in the bundle but not in the table], "foreign_folders": [top-level folders
    holding no listed file, see ``_foreign_folders``]}`` (``summarize_problems`` puts it in a few lines)

    ``problem`` is one of ``missing``, ``size``, ``sha256``, ``not-a-file``, ``symlink`` (a listed
    file, a folder on its path or any other entry in the bundle) and ``unlisted`` (a file the table
    does not list: the bundle carries code the device runs, so nothing may be added). Size is
    checked before a file is read (nothing bigger than the recorded size is read) and sha256 after,
    so one flipped byte anywhere is caught.
    """
    problems = []
    listed = set()
    nbytes = 0
    if not isinstance(files, list):
        raise ManifestError("manifest.json: 'files' should be a list", _REEXPORT)
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ManifestError("manifest.json: files[%d] is not an object with name/bytes/sha256" % i, _REEXPORT)
        name = check_name(entry["name"], "files[%d].name" % i)
        listed.add(name)
        want_bytes = entry.get("bytes")
        if isinstance(want_bytes, bool) or not isinstance(want_bytes, int) or want_bytes < 0:
            raise ManifestError("manifest.json: files[%d].bytes should be a byte count, got %r"
                                % (i, want_bytes), _REEXPORT)
        try:
            f, size = open_bundle_file(root, name)
        except FileNotFoundError:
            problems.append({"file": name, "problem": "missing", "expected": want_bytes, "actual": None})
            continue
        except FileRefused as e:
            problems.append({"file": name, "problem": e.problem, "expected": "regular file",
                             "actual": e.detail})
            continue
        except OSError as e:
            problems.append({"file": name, "problem": "not-a-file", "expected": "regular file",
                             "actual": "%s" % (e.strerror or e)})
            continue
        with f:
            if size != want_bytes:
                problems.append({"file": name, "problem": "size", "expected": want_bytes, "actual": size})
                continue
            got, n = _hash_open_file(f, want_bytes)
        nbytes += n
        if n != want_bytes:
            problems.append({"file": name, "problem": "size", "expected": want_bytes, "actual": n})
            continue
        want = str(entry.get("sha256", "")).lower()
        if want != got:
            problems.append({"file": name, "problem": "sha256", "expected": want, "actual": got})
    scan = scan_bundle(root)
    reported = {p["file"] for p in problems}
    for name in scan["symlinks"]:
        if name not in reported:
            problems.append({"file": name, "problem": "symlink", "expected": "regular file", "actual": "symlink"})
    for name in scan["special"]:
        if name not in reported:
            problems.append({"file": name, "problem": "not-a-file", "expected": "regular file", "actual": "special"})
    unlisted = [n for n in scan["files"] if n not in listed and n != manifest_name and not is_ignored_unlisted(n)]
    for name in unlisted:
        problems.append({"file": name, "problem": "unlisted", "expected": None, "actual": "present"})
    return {"ok": not problems, "files_checked": len(files), "bytes_checked": nbytes,
            "problems": problems, "unlisted": unlisted, "foreign_folders": _foreign_folders(root, problems, listed)}


_FOREIGN_KINDS = ("unlisted", "symlink", "not-a-file")


def _foreign_folders(root, problems, listed):
    """Top-level folders that hold no listed file but hold unlisted entries (a venv, a dataset ...):
    ``[{"folder", "entries", "venv"}]``."""
    listed_tops = {n.split("/")[0] for n in listed}
    counts = {}
    for p in problems:
        top, sep, _rest = p["file"].partition("/")
        if sep and top not in listed_tops and p["problem"] in _FOREIGN_KINDS:
            counts[top] = counts.get(top, 0) + 1
    out = []
    for top in sorted(counts):
        try:
            venv = stat.S_ISREG(os.lstat(os.path.join(root, top, "pyvenv.cfg")).st_mode)
        except OSError:
            venv = False
        out.append({"folder": top, "entries": counts[top], "venv": venv})
    return out


_SHOWN_NAMES = 3
_MAX_LINES = 6


def summarize_problems(report):
    """The problems of a ``check_files`` report as a few lines: a folder the manifest does not list
    (a venv ...) is one line saying what it is and where it belongs, many unlisted files are one line
    with a count and a few names, and at most ``_MAX_LINES`` lines in all."""
    foreign = {f["folder"]: f for f in report.get("foreign_folders") or []}
    lines, loose_unlisted = [], []
    for f in foreign.values():
        n = "{:,}".format(f["entries"])
        if f["venv"]:
            lines.append("%s/ is a Python virtual environment (%s entries not listed in the manifest): create it "
                         "outside the bundle, e.g. python3 -m venv ~/edgec-venv" % (f["folder"], n))
        else:
            lines.append("%s/ is a folder the manifest does not list (%s entries): move it out of the bundle "
                         "(a bundle may hold only the files it lists)" % (f["folder"], n))
    for p in report["problems"]:
        top, sep, _rest = p["file"].partition("/")
        if sep and top in foreign and p["problem"] in _FOREIGN_KINDS:
            continue
        if p["problem"] == "unlisted":
            loose_unlisted.append(p["file"])
        else:
            lines.append(describe_problem(p))
    if len(loose_unlisted) > _SHOWN_NAMES:
        lines.append("%s files are not listed in the manifest: %s and %s more (a bundle may hold only the files "
                     "it lists: move them out of the bundle)" % ("{:,}".format(len(loose_unlisted)),
                                                                 ", ".join(loose_unlisted[:_SHOWN_NAMES]),
                                                                 "{:,}".format(len(loose_unlisted) - _SHOWN_NAMES)))
    else:
        lines.extend(describe_problem({"file": n, "problem": "unlisted"}) for n in loose_unlisted)
    if len(lines) > _MAX_LINES:
        lines[_MAX_LINES - 1:] = ["and %s more problems" % "{:,}".format(len(lines) - _MAX_LINES + 1)]
    return lines


def describe_problem(p):
    """One-line description of one ``check_files`` problem."""
    kind = p["problem"]
    if kind == "missing":
        return "%s is missing" % p["file"]
    if kind == "size":
        return "%s has %s bytes, manifest says %s" % (p["file"], p["actual"], p["expected"])
    if kind == "sha256":
        return "%s sha256 mismatch (got %s..., manifest %s...)" % (
            p["file"], str(p["actual"])[:12], str(p["expected"])[:12])
    if kind == "symlink":
        where = p.get("actual")
        if isinstance(where, str) and where not in ("symlink", p["file"]):
            return "%s: %s is a symlink (a bundle holds regular files only)" % (p["file"], where)
        return "%s is a symlink (a bundle holds regular files only)" % p["file"]
    if kind == "unlisted":
        return "%s is not listed in the manifest (a bundle may hold only the files it lists)" % p["file"]
    if kind == "too-big":
        return "%s is bigger than the manifest allows" % p["file"]
    return "%s is not a regular file" % p["file"]


def require_intact(root, files):
    """Raise IntegrityError naming the first bad file (and counting the rest)."""
    report = check_files(root, files)
    if not report["ok"]:
        probs = report["problems"]
        lines = summarize_problems(report)
        msg = lines[0] + ("; " + "; ".join(lines[1:3]) if len(lines) > 1 else "")
        raise IntegrityError("bundle integrity check failed: " + msg,
                             "the bundle was corrupted or edited after export; copy it again",
                             problems=probs)
    return report
