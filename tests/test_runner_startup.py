"""Runner start-up is hostile-input territory: nothing in the bundle folder may be imported before the
bundle is checked (run.py, ``python -m edgec_ondevice``), and a folder that does not belong in a bundle
(a venv) is one line saying so, not one line per file.

One small signed bundle (tests/test_ondevice.py's builder, ONNX) for the module.
"""

import os
import shutil
import subprocess
import sys

import pytest

import test_ondevice as tod
from edgec.signing import generate_keypair, sign_bundle

# Modules the runner or the interpreter may import on the way to verify; the test adds every module a
# clean run imports (-X importtime), so a new import is covered without editing this list.
PLANTED = ("tempfile", "random", "json", "hashlib", "atexit", "importlib", "struct", "zlib", "lzma", "numpy",
           "argparse", "stat", "errno", "platform", "zipfile", "base64", "binascii", "math", "time", "subprocess",
           "onnxruntime", "cryptography", "runpy", "sitecustomize", "usercustomize", "edgec_ondevice", "os", "io")


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("cryptography")
    base = tmp_path_factory.mktemp("startup")
    model, train_raw, eval_raw, eval_y = tod._train_digits_mlp()
    bundle = tod._build_bundle("onnx", base / "bundle", model, train_raw, eval_raw, eval_y)
    _private, public = generate_keypair(base / "keys" / "edgec")
    sign_bundle(bundle, _private)
    return bundle, public


@pytest.fixture
def bundle(signed, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(signed[0], dst)
    return dst


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONSAFEPATH")}


def run(bundle, *args, python_args=()):
    return subprocess.run([sys.executable, *python_args, *map(str, args)], cwd=bundle, capture_output=True,
                          text=True, env=_env(), timeout=300)


def _imported_modules(bundle, public):
    p = run(bundle, "run.py", "verify", "--no-accuracy", "--public-key", public, python_args=("-X", "importtime"))
    assert p.returncode == 0, p.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in p.stderr.splitlines()
            if line.startswith("import time:") and "|" in line} - {"imported package", "__main__"}


def _plant(bundle, names, traces):
    for name in names:
        (bundle / (name + ".py")).write_text("open(%r, 'w').write('ran')\n" % str(traces / name))
    (bundle / "evil.pth").write_text("import os; open(%r, 'w').write('ran')\n" % str(traces / "pth"))


def _assert_refused_cleanly(p, traces, n_planted):
    assert sorted(os.listdir(traces)) == [], "code planted in the bundle ran: %s" % os.listdir(traces)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "files are not listed in the manifest" in err[0] and "{:,}".format(n_planted) in err[0], err[0]


def test_no_file_in_the_bundle_runs_before_a_signed_bundle_is_checked(bundle, signed, tmp_path):
    names = sorted(set(PLANTED) | _imported_modules(bundle, signed[1]))
    assert {"numpy", "argparse", "cryptography"} <= set(names)
    traces = tmp_path / "traces"
    traces.mkdir()
    _plant(bundle, names, traces)
    p = run(bundle, "run.py", "verify", "--public-key", signed[1])
    _assert_refused_cleanly(p, traces, len(names) + 1)


@pytest.mark.parametrize("how", ["script elsewhere", "python -m run", "-S"])
def test_other_ways_to_start_run_py_do_not_import_from_the_bundle(bundle, signed, tmp_path, how):
    traces = tmp_path / "traces"
    traces.mkdir()
    _plant(bundle, PLANTED, traces)
    if how == "script elsewhere":  # run from another folder: the bundle folder is still path[0]
        p = run(tmp_path, bundle / "run.py", "verify", "--public-key", signed[1])
    elif how == "python -m run":
        p = run(bundle, "run", "verify", "--public-key", signed[1], python_args=("-m",))
    else:  # no site: os is not loaded at start-up (and numpy, in site-packages, is not found)
        p = run(bundle, "run.py", "verify", "--public-key", signed[1], python_args=("-S",))
        assert os.listdir(traces) == [] and p.returncode == 2, (os.listdir(traces), p.stderr[-2000:])
        assert p.stderr.strip() == "error: numpy is not installed (hint: pip install -r requirements.txt)"
        return
    _assert_refused_cleanly(p, traces, len(PLANTED) + 1)


def test_python_m_edgec_ondevice_in_the_bundle_folder_does_not_import_from_it(bundle, signed, tmp_path):
    import _imp
    if not _imp.is_frozen("runpy"):
        pytest.skip("runpy is not frozen in this Python: -m imports it from the current folder before any edgec code")
    traces = tmp_path / "traces"
    traces.mkdir()
    _plant(bundle, [n for n in PLANTED if n != "edgec_ondevice"], traces)
    p = run(bundle, "edgec_ondevice", "verify", "--public-key", signed[1], python_args=("-m",))
    _assert_refused_cleanly(p, traces, len(PLANTED))


def test_no_bytecode_folder_is_created_or_read(bundle, signed):
    p = run(bundle, "run.py", "verify", "--no-accuracy", "--public-key", signed[1])
    assert p.returncode == 0, p.stderr[-2000:]
    assert not list(bundle.rglob("__pycache__"))


# ---------------------------------------------------------------------------------------------
# a folder that does not belong in a bundle: one line
# ---------------------------------------------------------------------------------------------
def test_a_venv_inside_the_bundle_is_one_line_saying_where_it_belongs(bundle):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bundle / "venv")], check=True, timeout=120)
    for i in range(300):  # what a venv with packages holds: many files
        (bundle / "venv" / "lib" / ("f%d.py" % i)).write_text("")
    p = run(bundle, "run.py", "verify")
    assert p.returncode == 1, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert len(out.splitlines()) < 30, out
    err = p.stderr.strip().splitlines()
    assert len(err) == 1, p.stderr
    assert "venv/ is a Python virtual environment" in err[0] and "outside the bundle" in err[0], err[0]
    assert "python3 -m venv ~/edgec-venv" in err[0]
    assert "symlink" not in out and "pyvenv.cfg" not in out


def test_a_foreign_folder_and_many_loose_files_are_counted_with_a_few_names(bundle):
    (bundle / "photos").mkdir()
    for i in range(500):
        (bundle / "photos" / ("p%03d.jpg" % i)).write_bytes(b"x")
    for i in range(40):
        (bundle / ("note%02d.txt" % i)).write_text("x")
    p = run(bundle, "run.py", "verify")
    assert p.returncode == 1
    out = p.stdout + p.stderr
    assert len(out.splitlines()) < 30, out
    assert "photos/ is a folder the manifest does not list (500 entries): move it out of the bundle" in out
    assert "40 files are not listed in the manifest: note00.txt, note01.txt, note02.txt and 37 more" in out
    assert "p499.jpg" not in out


def test_a_few_unlisted_files_are_still_named_one_by_one(bundle):
    (bundle / "extra.txt").write_text("x")
    (bundle / "edgec_ondevice" / "extra.py").write_text("x")
    p = run(bundle, "run.py", "verify")
    assert p.returncode == 1
    assert "edgec_ondevice/extra.py is not listed in the manifest" in p.stdout
    assert "extra.txt is not listed in the manifest" in p.stdout
