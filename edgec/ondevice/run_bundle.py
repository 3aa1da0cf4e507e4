#!/usr/bin/env python3
"""edgec bundle runner. From the bundle directory:

    python run.py verify [--exact] [--json FILE]
    python run.py bench [--warmup N] [--runs N] [--min-seconds S] [--no-sweep] [--json FILE] [--markdown]
    python run.py predict samples.npy

Needs numpy and the runtime in requirements.txt; uses edgec_ondevice/ next to this file.
Exit codes: 0 ok, 1 a check failed, 2 usage error / bad bundle / missing runtime.
"""

import os
import sys

sys.dont_write_bytecode = True  # keep the bundle's files exactly as exported
HERE = os.path.dirname(os.path.abspath(__file__))


def _self_check():
    """The runner itself failed to import: name the corrupted bundle files (stdlib only)."""
    import hashlib
    import json
    try:
        with open(os.path.join(HERE, "manifest.json"), "rb") as f:
            files = json.loads(f.read().decode("utf-8"))["files"]
    except Exception:
        return ["manifest.json (unreadable)"]
    bad = []
    for e in files:
        p = os.path.join(HERE, *str(e["name"]).split("/"))
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError:
            bad.append(e["name"] + " (missing)")
            continue
        if len(data) != e.get("bytes") or hashlib.sha256(data).hexdigest() != e.get("sha256"):
            bad.append(e["name"])
    return bad


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    try:
        from edgec_ondevice.cli import main
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
