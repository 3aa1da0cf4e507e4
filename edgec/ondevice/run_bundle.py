#!/usr/bin/env python3
"""edgec bundle runner. From the bundle directory:

    python run.py verify [--exact] [--json FILE] [--public-key KEY]
    python run.py bench [--warmup N] [--runs N] [--min-seconds S] [--no-sweep] [--json FILE] [--markdown]
    python run.py predict samples.npy

Needs numpy and the runtime in requirements.txt (and cryptography for --public-key); uses
edgec_ondevice/ next to this file. Exit codes: 0 ok, 1 a check failed, 2 usage error / bad bundle /
missing runtime.

The bundle folder is taken off ``sys.path`` by the first statement, before anything is imported
(``sys`` is built in; ``os`` is loaded at interpreter start-up), so no file in the folder can stand
in for a module (tempfile.py, numpy.py ...) before the bundle is checked; ``edgec_ondevice`` is then
loaded from it by path. Bytecode is never read from the bundle's ``__pycache__`` folders, which the
manifest does not list.
"""

import sys

# Python puts this file's folder first on sys.path (not under -I or -P): nothing may be imported
# before it is taken off.
if __name__ == "__main__" and sys.path and not (sys.flags.isolated or getattr(sys.flags, "safe_path", False)):
    del sys.path[0]

import os  # noqa: E402  (never from the bundle: already loaded, or found in the standard library now)

sys.dont_write_bytecode = True  # keep the bundle's files exactly as exported
HERE = os.path.dirname(os.path.abspath(__file__))
_MAX_SELF_CHECK_BYTES = 1 << 30
# Bytecode is looked up under this prefix instead of __pycache__: a folder that cannot exist.
_NO_BYTECODE = os.path.join(os.devnull, "edgec-no-bytecode")


def _isolate():
    """Take every other spelling of the bundle folder off sys.path ('' or '.' when it is the current
    folder, PYTHONPATH entries) and never read bytecode from it."""
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    sys.pycache_prefix = _NO_BYTECODE


def _load_runner():
    import importlib.util
    pkg = os.path.join(HERE, "edgec_ondevice")
    spec = importlib.util.spec_from_file_location("edgec_ondevice", os.path.join(pkg, "__init__.py"),
                                                  submodule_search_locations=[pkg])
    if spec is None or spec.loader is None:
        raise ImportError("edgec_ondevice/__init__.py not found")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["edgec_ondevice"] = mod
    spec.loader.exec_module(mod)
    from edgec_ondevice.cli import main
    return main


def _confined(name):
    """The path of a manifest file name inside the bundle, or None when it could point elsewhere."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or ":" in name:
        return None
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return os.path.join(HERE, *parts)


def _self_check():
    """The runner itself failed to import: name the corrupted bundle files (stdlib only; reads only
    regular files inside the bundle, never more than the manifest records)."""
    import hashlib
    import json
    import stat
    try:
        with open(os.path.join(HERE, "manifest.json"), "rb") as f:
            files = json.loads(f.read(16 << 20).decode("utf-8"))["files"]
        files = [(str(e["name"]), int(e["bytes"]), str(e["sha256"])) for e in files]
    except Exception:
        return ["manifest.json (unreadable)"]
    bad = []
    real_here = os.path.realpath(HERE)
    for name, size, sha in files:
        path = _confined(name)
        if path is None:
            bad.append(name[:80] + " (outside the bundle)")
            continue
        try:
            st = os.lstat(path)
        except OSError:
            bad.append(name + " (missing)")
            continue
        if not stat.S_ISREG(st.st_mode) or os.path.realpath(path) != os.path.join(real_here, *name.split("/")):
            bad.append(name + " (not a regular file)")
            continue
        if st.st_size != size or size > _MAX_SELF_CHECK_BYTES:
            bad.append(name)
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(size + 1))
        if h.hexdigest() != sha:
            bad.append(name)
    return bad


if __name__ == "__main__":
    _isolate()
    try:
        main = _load_runner()
    except Exception as exc:  # a corrupt copy of the runner must still say what is wrong
        if "--debug" in sys.argv:
            raise
        bad = _self_check()
        if bad:
            sys.stderr.write("error: bundle integrity check failed: %s (hint: the bundle was corrupted or "
                             "edited after export; copy it again)\n" % ", ".join(bad))
            sys.exit(1)
        if isinstance(exc, ImportError) and getattr(exc, "name", "") and exc.name.split(".")[0] == "numpy":
            sys.stderr.write("error: numpy is not installed (hint: pip install -r requirements.txt)\n")
        else:
            sys.stderr.write("error: edgec_ondevice failed to import: %s: %s (hint: rerun with --debug)\n"
                             % (type(exc).__name__, " ".join(str(exc).split())[:200]))
        sys.exit(2)
    sys.exit(main(sys.argv[1:], bundle_dir=HERE, prog="run.py"))
