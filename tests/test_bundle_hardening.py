"""Hardening of the bundle and its readers (the security issue), on tiny hand-built bundles.

1. Names from manifest.json are confined to the bundle; symlinks, special files and unlisted files
   are refused; reads are bounded; malformed fields are one ManifestError, never a traceback.
2. Target profiles: safe names, confined requirements files, bounded threads, non-empty providers.
3. Per-machine recommendations (recommended.json): bench never edits the manifest, and never
   narrows another machine's sweep or settings.
5. The runtimes are split one module per runtime, with relative imports only.

The bundles come from tests/test_ondevice.py's builder (litert-torch / torch.onnx, real runtimes).
"""

import ast
import copy
import hashlib
import json
import os
import py_compile
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import test_ondevice as tod
from edgec.base.errors import ConfigError
from edgec.ondevice import (BundleError, IntegrityError, ManifestError, bench_bundle, load_bundle, machine_identity,
                            machine_key, verify_bundle)
from edgec.ondevice import manifest as manifest_mod
from edgec.ondevice import transport
from edgec.ondevice.integrity import check_files
from edgec.ondevice.recommend import RECOMMENDED_SCHEMA, store_recommendation
from edgec.ondevice.runtimes import import_runtime
from support import reseal_manifest

ONDEVICE_DIR = tod.ONDEVICE_DIR
FAST = dict(warmup=1, warmup_seconds=0.0, runs=5, min_seconds=0.0, max_seconds=2.0, batch_sizes=(1,))


@pytest.fixture(scope="module")
def base_bundles(tmp_path_factory):
    pytest.importorskip("litert_torch")
    pytest.importorskip("onnxruntime")
    base = tmp_path_factory.mktemp("hardening")
    model, train_raw, eval_raw, eval_y = tod._train_digits_mlp()
    out = {k: tod._build_bundle(k, base / k, model, train_raw, eval_raw, eval_y) for k in ("onnx", "tflite")}
    # the onnx bundle also ships a transport payload (plain LZMA2 of the model file), as export does
    try:
        from edgec.pipeline.algorithms.transport_codec import encode_plain
    except ImportError:  # older layout
        from edgec.pipeline.transport_codec import encode_plain
    b = out["onnx"]
    (b / "model.onnx.edgt").write_bytes(encode_plain((b / "model.onnx").read_bytes()))
    m = tod.read_manifest(b)
    m["size"]["transport_file"] = "model.onnx.edgt"
    tod.write_manifest(b, m)
    return out


@pytest.fixture
def bundle(base_bundles, tmp_path):
    def make(kind="onnx", name=None):
        dst = tmp_path / (name or kind)
        shutil.copytree(base_bundles[kind], dst)
        return dst
    return make


def edit_manifest(b, change):
    m = tod.read_manifest(b)
    change(m)
    (b / "manifest.json").write_text(json.dumps(m))
    reseal_manifest(b)
    return m


def set_key(m, dotted, value):
    cur = m
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur = cur[int(p)] if isinstance(cur, list) else cur[p]
    last = parts[-1]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


# ---------------------------------------------------------------------------------------------
# 1. paths taken from the manifest
# ---------------------------------------------------------------------------------------------
def test_intact_bundle_with_transport_verifies(base_bundles):
    res = verify_bundle(base_bundles["onnx"], check_accuracy=False)
    assert res["ok"], res["errors"]
    assert [c["name"] for c in res["checks"]][:2] == ["integrity", "transport"]


@pytest.mark.parametrize("value", ["/dev/zero", "../outside.edgt", "/etc/passwd", "a/../../x", "C:evil",
                                   "sub\\..\\..\\x", "", "./model.onnx.edgt", "a//b"])
def test_transport_file_must_be_a_plain_name_inside_the_bundle(bundle, value):
    b = bundle()
    edit_manifest(b, lambda m: m["size"].update(transport_file=value))
    with pytest.raises(ManifestError, match="size.transport_file|outside the bundle|plain relative|no file name") as ei:
        verify_bundle(b)
    assert ei.value.exit_code == 2 and "\n" not in str(ei.value)


def test_transport_file_must_be_listed(bundle):
    b = bundle()
    (b / "other.edgt").write_bytes((b / "model.onnx.edgt").read_bytes())
    edit_manifest(b, lambda m: m["size"].update(transport_file="other.edgt"))
    with pytest.raises(ManifestError, match="size.transport_file 'other.edgt' is not listed in files"):
        load_bundle(b)


@pytest.mark.parametrize("key, value", [
    ("model_file", "/dev/zero"), ("model_file", "../model.onnx"), ("model_file", "nope.onnx"),
    ("extra_model_files", ["/etc/passwd"]), ("extra_model_files", ["../x"]), ("extra_model_files", ["missing.onnx"]),
])
def test_model_file_names_are_confined_and_listed(bundle, key, value):
    b = bundle()
    edit_manifest(b, lambda m: m.update({key: value}))
    with pytest.raises(ManifestError, match="outside the bundle|not listed in files"):
        load_bundle(b)


@pytest.mark.parametrize("name", ["/etc/hostname", "../x", "a/./b", "dir\\file", "x\x00y", "recommended.json",
                                  "manifest.sig", "edgec_ondevice/__pycache__/cli.cpython-311.pyc"])
def test_file_table_names_are_confined(bundle, name):
    b = bundle()
    edit_manifest(b, lambda m: m["files"].append({"name": name, "bytes": 1, "sha256": "0" * 64}))
    with pytest.raises(ManifestError):
        load_bundle(b)


def test_symlinked_listed_file_is_refused_even_with_matching_content(bundle, tmp_path):
    b = bundle()
    outside = tmp_path / "labels-copy.txt"
    shutil.copy(b / "labels.txt", outside)
    (b / "labels.txt").unlink()
    (b / "labels.txt").symlink_to(outside)  # same bytes, same sha256: only the link gives it away
    res = verify_bundle(b, check_accuracy=False)
    assert not res["ok"]
    assert ("labels.txt", "symlink") in {(p["file"], p["problem"]) for p in res["integrity"]["problems"]}
    assert any("labels.txt is a symlink" in e for e in res["errors"])
    with pytest.raises(IntegrityError, match="symlink"):
        load_bundle(b).require_intact()


def test_symlink_anywhere_in_the_bundle_is_refused(bundle, tmp_path):
    b = bundle()
    (b / "edgec_ondevice" / "helper.py").symlink_to(tmp_path / "nowhere.py")  # dangling, unlisted
    (b / "data").symlink_to(tmp_path, target_is_directory=True)
    res = verify_bundle(b, check_accuracy=False)
    got = {(p["file"], p["problem"]) for p in res["integrity"]["problems"]}
    assert {("edgec_ondevice/helper.py", "symlink"), ("data", "symlink")} <= got
    assert not res["ok"]


def test_symlinked_folder_on_a_listed_path_is_refused(bundle, tmp_path):
    b = bundle()
    shutil.move(str(b / "edgec_ondevice"), str(tmp_path / "runner"))
    (b / "edgec_ondevice").symlink_to(tmp_path / "runner", target_is_directory=True)
    res = verify_bundle(b, check_accuracy=False)
    assert not res["ok"]
    probs = res["integrity"]["problems"]
    assert all(p["problem"] == "symlink" for p in probs) and any(p["file"] == "edgec_ondevice" for p in probs)


def test_fifo_in_place_of_a_listed_file_is_refused_without_blocking(bundle):
    b = bundle()
    (b / "labels.txt").unlink()
    os.mkfifo(b / "labels.txt")
    os.mkfifo(b / "extra.fifo")
    res = verify_bundle(b, check_accuracy=False)  # would block forever if the FIFO were opened for reading
    got = {(p["file"], p["problem"]) for p in res["integrity"]["problems"]}
    assert {("labels.txt", "not-a-file"), ("extra.fifo", "not-a-file")} <= got


def test_symlinked_manifest_is_refused(bundle, tmp_path):
    b = bundle()
    shutil.move(str(b / "manifest.json"), str(tmp_path / "m.json"))
    (b / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(ManifestError, match="manifest.json is a symlink"):
        load_bundle(b)


def test_pycache_is_ignored_but_nothing_else_unlisted(bundle):
    b = bundle()
    cache = b / "edgec_ondevice" / "__pycache__"
    cache.mkdir()
    (cache / "cli.cpython-311.pyc").write_bytes(b"\0" * 16)
    assert check_files(str(b), tod.read_manifest(b)["files"])["ok"]
    (cache / "notes.txt").write_text("x")
    (b / "recommended.json").write_text("{}")  # advisory file: allowed (and ignored when malformed)
    (b / "manifest.sig").write_text("{}")
    report = check_files(str(b), tod.read_manifest(b)["files"])
    assert report["unlisted"] == ["edgec_ondevice/__pycache__/notes.txt"]


def test_listed_file_bigger_than_recorded_is_not_read(bundle, monkeypatch):
    b = bundle()
    with open(b / "eval.npz", "ab") as f:
        f.truncate(8 << 30)  # sparse 8 GiB: refused on its size, never hashed
    import edgec.ondevice.integrity as integrity
    seen = []
    real = integrity._hash_open_file
    monkeypatch.setattr(integrity, "_hash_open_file", lambda f, limit: seen.append(limit) or real(f, limit))
    res = verify_bundle(b, check_accuracy=False)
    assert ("eval.npz", "size") in {(p["file"], p["problem"]) for p in res["integrity"]["problems"]}
    assert max(seen) < 1 << 20


def test_transport_decode_is_bounded():
    model = bytes(range(256)) * 64
    try:
        from edgec.pipeline.algorithms.transport_codec import encode_plain
    except ImportError:
        from edgec.pipeline.transport_codec import encode_plain
    payload = encode_plain(model)
    assert transport.decode(payload, max_size=len(model)) == model
    with pytest.raises(transport.TransportError, match="more than the %d allowed" % (len(model) - 1)):
        transport.decode(payload, max_size=len(model) - 1)


def test_transport_payload_that_does_not_decode_to_the_model_fails(bundle):
    b = bundle()
    try:
        from edgec.pipeline.algorithms.transport_codec import encode_plain
    except ImportError:
        from edgec.pipeline.transport_codec import encode_plain
    (b / "model.onnx.edgt").write_bytes(encode_plain(b"something else entirely" * 10))
    tod.write_manifest(b, tod.read_manifest(b))
    res = verify_bundle(b, check_accuracy=False)
    assert not res["ok"] and any(e.startswith("transport:") for e in res["errors"])


def _npz_with_header(path, shape, dtype="<f4", payload=b""):
    """An .npz whose one array declares ``shape`` but carries only ``payload`` bytes."""
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (dtype, tuple(shape))
    header = header + " " * (63 - (10 + len(header)) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + payload
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("inputs.npy", npy)
        z.writestr("expected.npy", npy)


def test_npz_allocation_is_capped_before_reading(bundle):
    b = bundle()
    _npz_with_header(b / "test_vectors.npz", (1 << 20, 1 << 20))  # declares 4 TiB
    tod.write_manifest(b, tod.read_manifest(b))
    with pytest.raises(ManifestError, match="need more than"):
        load_bundle(b).test_vectors()
    res = verify_bundle(b, check_accuracy=False)
    assert not res["ok"] and any("test_vectors.npz" in e and "need more than" in e for e in res["errors"])


def test_npz_refuses_objects_and_caps_are_configurable(bundle, monkeypatch):
    b = bundle()
    _npz_with_header(b / "test_vectors.npz", (2,), dtype="|O")
    tod.write_manifest(b, tod.read_manifest(b))
    with pytest.raises(ManifestError, match="numeric arrays only"):
        load_bundle(b).test_vectors()
    b2 = bundle(name="b2")
    monkeypatch.setattr(manifest_mod, "EVAL_MAX_BYTES", 1000)
    with pytest.raises(ManifestError, match="eval.npz: its arrays need more than 1000 bytes"):
        load_bundle(b2).eval_set()


# ---------------------------------------------------------------------------------------------
# 1b. malformed manifest fields: one ManifestError naming the key, never a traceback
# ---------------------------------------------------------------------------------------------
BAD_FIELDS = [
    ("preprocessing.scale", "abc"), ("preprocessing.scale", [1.0, "x"]), ("preprocessing.offset", {"a": 1}),
    ("preprocessing.raw_shape", [8, -8]), ("preprocessing.raw_shape", [10 ** 9, 10 ** 9]),
    ("preprocessing.raw_dtype", "object"), ("inputs.0.shape", [1, -5, 8, 8]), ("inputs.0.shape", [1, 10 ** 12]),
    ("inputs.0.shape", "1,8,8"), ("outputs.0.shape", [None, 10 ** 10]), ("inputs.0.dtype", "O"),
    ("inputs.0.quantization", {"scale": "abc", "zero_point": 0}),
    ("inputs.0.quantization", {"scale": -1.0, "zero_point": 0}),
    ("inputs.0.quantization", {"scale": 0.1, "zero_point": "z"}), ("inputs.0.layout", 5),
    ("runtime.recommended", {"threads": 10 ** 9}), ("runtime.recommended", {"threads": "abc"}),
    ("runtime.recommended", {"graph_optimization_level": "max"}), ("runtime.recommended", [1]),
    ("runtime.recommended", {"provider": {"x": 1}}), ("runtime.providers", 5), ("runtime.packages", "onnxruntime"),
    ("runtime.min_version", 1.2), ("runtime.min_versions", "2.3"), ("runtime.min_versions", {"ai-edge-litert": 2}),
    ("runtime.min_versions", {"x" * 65: "1"}), ("metrics.accuracy", "abc"), ("metrics.accuracy", 7.0),
    ("metrics.eval_samples", "many"), ("metrics.eval_samples", -3), ("tolerance.atol", "abc"),
    ("tolerance.atol", -1), ("tolerance.accuracy", "high"), ("labels", "0123456789"), ("labels", [{"a": 1}]),
    ("files.0.bytes", "12"), ("files.0.bytes", -1), ("files.0.sha256", "xyz"), ("files.0.name", 5),
    ("size.transport_bytes", "big"), ("size", []), ("target", "rpi"), ("target.profile", []), ("inputs", []),
    ("inputs.0", "x"), ("model_file", 5), ("extra_model_files", "model.onnx"), ("schema_version", "1"),
]


@pytest.mark.parametrize("key, value", BAD_FIELDS, ids=["%s=%r" % kv for kv in BAD_FIELDS])
def test_malformed_field_is_one_manifest_error_naming_it(bundle, key, value):
    b = bundle()
    edit_manifest(b, lambda m: set_key(m, key, value))
    with pytest.raises(ManifestError) as ei:
        load_bundle(b)
    msg = str(ei.value)
    assert "\n" not in msg and ei.value.exit_code == 2
    top = key.split(".")[0]
    assert top in msg or "schema_version" in msg, msg


def test_nan_and_infinity_are_refused(bundle):
    b = bundle()
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text.replace('"atol": 0.0001', '"atol": NaN'))
    with pytest.raises(ManifestError, match="NaN"):
        load_bundle(b)


def test_any_mangled_field_gives_a_bundle_error_or_a_result(bundle):
    """Every leaf of the manifest replaced by values of the wrong type: verify either works or
    raises BundleError (one line); no other exception escapes."""
    b = bundle()
    good = tod.read_manifest(b)
    leaves = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list) and node and path[-1] != "files":
            for i, v in enumerate(node[:2]):
                walk(v, path + [str(i)])
        else:
            leaves.append(".".join(path))
    walk({k: v for k, v in good.items() if k not in ("lineage", "versions")}, [])
    for key in leaves:
        for value in ("abc", -1, 10 ** 12, None, [], {}, True, 0.5):
            m = copy.deepcopy(good)
            set_key(m, key, value)
            (b / "manifest.json").write_text(json.dumps(m))
            reseal_manifest(b)
            try:
                verify_bundle(b, check_accuracy=True)
            except BundleError as e:
                assert "\n" not in str(e)
            except Exception as e:  # pragma: no cover - what this test exists to catch
                pytest.fail("%s=%r: %s: %s" % (key, value, type(e).__name__, e))


def run_py(bundle, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    return subprocess.run([sys.executable, "run.py", *map(str, args)], cwd=bundle, capture_output=True, text=True,
                          env=env, timeout=300)


def test_run_py_bad_field_is_exit_2_one_line(bundle):
    b = bundle()
    edit_manifest(b, lambda m: m["preprocessing"].update(scale="abc"))
    p = run_py(b, "verify")
    assert p.returncode == 2, p.stderr
    assert "preprocessing.scale" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_run_py_threads_out_of_range_is_a_usage_error(bundle):
    p = run_py(bundle(), "verify", "--threads", str(10 ** 9))
    assert p.returncode == 2 and "--threads must be between 1 and 256" in p.stderr


# ---------------------------------------------------------------------------------------------
# 1c. run.py runs the runner it lists, and nothing else from the bundle folder
# ---------------------------------------------------------------------------------------------
def test_run_py_does_not_import_other_modules_from_the_bundle(bundle, tmp_path):
    b = bundle()
    marker = tmp_path / "pwned"
    (b / "numpy.py").write_text("open(%r, 'w').write('x')\nraise SystemExit(42)\n" % str(marker))
    tod.write_manifest(b, tod.read_manifest(b))  # even listed, it must not shadow numpy
    p = run_py(b, "verify", "--no-accuracy")
    assert p.returncode == 0, p.stderr[-2000:]
    assert not marker.exists()


def test_run_py_never_reads_bytecode_from_the_bundle(bundle):
    """__pycache__/*.pyc is not in the file table: a planted .pyc with the source's mtime and size
    would run instead of the listed source if Python were allowed to read it."""
    b = bundle()
    src = b / "edgec_ondevice" / "cli.py"
    original = src.read_bytes()
    evil = b"import sys\nsys.exit(42)\n"
    evil += b"#" * (len(original) - len(evil) - 1) + b"\n"
    fake = b / ".." / "fake_cli.py"
    fake.write_bytes(evil)
    os.utime(src, (1_700_000_000, 1_700_000_000))
    os.utime(fake, (1_700_000_000, 1_700_000_000))
    import importlib.util
    cached = Path(importlib.util.cache_from_source(str(src)))
    py_compile.compile(str(fake), cfile=str(cached), doraise=True)
    assert cached.is_file()
    p = run_py(b, "verify", "--no-accuracy")
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])


def test_run_py_self_check_stays_inside_the_bundle(bundle):
    b = bundle()
    (b / "edgec_ondevice" / "cli.py").write_text("raise ImportError('broken')\n")
    edit_manifest(b, lambda m: m["files"].append({"name": "/dev/zero", "bytes": 1, "sha256": "0" * 64}))
    p = run_py(b, "verify")  # the fallback names bad files; it must not read /dev/zero
    assert p.returncode == 1 and "/dev/zero (outside the bundle)" in p.stderr


# ---------------------------------------------------------------------------------------------
# 2. target profiles
# ---------------------------------------------------------------------------------------------
BOARD = 'format = "tflite"\nprecision = "int8"\nprecisions = ["int8"]\n'


def board(tmp_path, body, name="board.toml"):
    p = tmp_path / name
    p.write_text(body)
    return p


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "..", "Rpi", "-x", "x" * 65, ".hidden", "a b", "a..b"])
def test_profile_name_must_be_a_safe_identifier(tmp_path, name):
    from edgec.targets.profile import load_target
    p = board(tmp_path, 'name = %s\n%srequirements = ["x"]\n' % (json.dumps(name), BOARD))
    with pytest.raises(ConfigError) as ei:
        load_target(str(p))
    assert str(p) in str(ei.value) and "name" in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("name", ["rpi", "my-board.v2", "a_b", "0"])
def test_profile_safe_names_load(tmp_path, name):
    from edgec.targets.profile import load_target
    p = board(tmp_path, 'name = "%s"\n%srequirements = ["x"]\n' % (name, BOARD))
    assert load_target(str(p)).name == name


@pytest.mark.parametrize("value", ["/etc/passwd", "../secret.txt", "sub/../../secret.txt", "~/x.txt", "C:x.txt"])
def test_requirements_file_cannot_escape(tmp_path, value):
    from edgec.targets.profile import load_target
    (tmp_path / "secret.txt").write_text("stolen\n")
    d = tmp_path / "boards"
    d.mkdir()
    p = board(d, 'name = "b"\n%srequirements_file = %s\n' % (BOARD, json.dumps(value)))
    with pytest.raises(ConfigError) as ei:
        load_target(str(p))
    assert "requirements_file" in str(ei.value) and str(p) in str(ei.value)


def test_requirements_file_symlink_is_refused(tmp_path):
    from edgec.targets.profile import load_target
    (tmp_path / "real.txt").write_text("numpy\n")
    (tmp_path / "reqs.txt").symlink_to(tmp_path / "real.txt")
    p = board(tmp_path, 'name = "b"\n%srequirements_file = "reqs.txt"\n' % BOARD)
    with pytest.raises(ConfigError, match="requirements_file.*symlink"):
        load_target(str(p))


def test_user_board_requirements_file_is_beside_the_board(tmp_path):
    from edgec.targets.profile import load_target
    (tmp_path / "reqs").mkdir()
    (tmp_path / "reqs" / "device.txt").write_text("# device\nai-edge-litert>=2.3\nnumpy\n")
    p = board(tmp_path, 'name = "b"\n%srequirements_file = "reqs/device.txt"\n' % BOARD)
    assert load_target(str(p)).requirements == ["ai-edge-litert>=2.3", "numpy"]
    # a built-in profile's list is not reachable from a user's board
    p2 = board(tmp_path, 'name = "b"\n%srequirements_file = "rpi-device-requirements.txt"\n' % BOARD, "b2.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_target(str(p2))


def test_builtin_profiles_still_load_their_requirement_files():
    from edgec.targets.profile import builtin_targets
    targets = builtin_targets()
    assert targets["rpi"].requirements == ["ai-edge-litert==2.3.0"]  # the runtime that made the test vectors
    assert set(targets) >= {"rpi", "mobile", "desktop-gpu"}


@pytest.mark.parametrize("line, key", [("providers = []", "providers"), ("threads = 0", "threads"),
                                       ("threads = 1000000000", "threads"), ('providers = ["a/b"]', "providers")])
def test_profile_ranges(tmp_path, line, key):
    from edgec.targets.profile import load_target
    p = board(tmp_path, 'name = "b"\n%srequirements = ["x"]\n%s\n' % (BOARD, line))
    with pytest.raises(ConfigError) as ei:
        load_target(str(p))
    assert ("%s: %s" % (p, key)) in str(ei.value)


# ---------------------------------------------------------------------------------------------
# 3. per-machine recommendations
# ---------------------------------------------------------------------------------------------
def test_bench_keeps_recommendation_per_machine_and_never_touches_the_manifest(bundle):
    b = bundle("tflite")
    before = (b / "manifest.json").read_bytes()
    res = bench_bundle(b, sweep=True, max_threads=2, accuracy=False, save_recommendation=True, **FAST)
    assert res["ok"], res["errors"]
    assert (b / "manifest.json").read_bytes() == before
    rec = json.loads((b / "recommended.json").read_text())
    assert rec["schema"] == RECOMMENDED_SCHEMA and rec["runtime"] == "tflite"
    entry = rec["machines"][res["machine_key"]]
    assert entry["settings"] == res["recommended"] and entry["machine"]["cpu_count"] == os.cpu_count()
    assert stat.S_IMODE((b / "recommended.json").stat().st_mode) == 0o644
    assert res["recommendation"]["saved"]
    assert verify_bundle(b, check_accuracy=False)["ok"]  # advisory file: not an unlisted file


def test_this_machines_recommendation_is_used_and_another_machines_is_not(bundle):
    b = bundle("tflite")
    rt = import_runtime("tflite")
    mine = machine_identity(rt)
    other = dict(mine, machine="aarch64", cpu="Cortex-A72", cpu_count=4, usable_cpus=4)
    store_recommendation(str(b), "tflite", other, {"threads": 3, "xnnpack": False})
    model = load_bundle(b).open_model()
    assert model.settings == {"threads": None, "xnnpack": True}  # the manifest's default, not the Pi's
    store_recommendation(str(b), "tflite", mine, {"threads": 1, "xnnpack": False})
    res = verify_bundle(b, check_accuracy=False)
    assert res["ok"] and res["settings"] == {"threads": 1, "xnnpack": False}
    assert any("recommended.json" in n for n in res["notes"])
    data = json.loads((b / "recommended.json").read_text())
    assert set(data["machines"]) == {machine_key(mine), machine_key(other)}


def test_manifest_and_stored_settings_do_not_narrow_the_sweep(bundle):
    """Old behaviour: bench wrote threads=1 into the manifest and later sweeps tried threads 1..1."""
    b = bundle("tflite")
    edit_manifest(b, lambda m: m["runtime"].update(recommended={"threads": 1, "xnnpack": True}))
    tod.write_manifest(b, tod.read_manifest(b))
    store_recommendation(str(b), "tflite", machine_identity(import_runtime("tflite")), {"threads": 1, "xnnpack": True})
    from edgec.ondevice.bench import _thread_cap
    from edgec.ondevice.machine import usable_cpu_count
    cap, _rule = _thread_cap(load_bundle(b), None)
    assert cap == min(usable_cpu_count(), 4)


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"schema": "edgec-recommended", "schema_version": 1, "runtime": "onnxruntime", "machines": {}}',
    '{"schema": "edgec-recommended", "schema_version": 1, "runtime": "tflite", "machines": {"zz": {}}}',
])
def test_malformed_recommendations_are_ignored_with_a_note(bundle, content):
    b = bundle("tflite")
    (b / "recommended.json").write_text(content)
    res = verify_bundle(b, check_accuracy=False)
    assert res["ok"] and any("recommended.json ignored" in n for n in res["notes"])


def test_tampered_recommendation_entry_is_ignored(bundle):
    b = bundle("tflite")
    ident = machine_identity(import_runtime("tflite"))
    store_recommendation(str(b), "tflite", ident, {"threads": 2, "xnnpack": True})
    data = json.loads((b / "recommended.json").read_text())
    entry = next(iter(data["machines"].values()))
    entry["settings"]["threads"] = 10 ** 9
    (b / "recommended.json").write_text(json.dumps(data))
    res = verify_bundle(b, check_accuracy=False)
    assert res["ok"] and res["settings"]["threads"] is None
    assert any("recommended.json ignored" in n and "threads" in n for n in res["notes"])


def test_desktop_gpu_bundle_keeps_its_gpu_provider_after_a_cpu_bench(bundle):
    b = bundle("onnx")
    edit_manifest(b, lambda m: m["runtime"].update(
        recommended={"threads": 4, "provider": "TensorrtExecutionProvider", "graph_optimization_level": "all"},
        providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]))
    tod.write_manifest(b, tod.read_manifest(b))
    before = (b / "manifest.json").read_bytes()
    res = bench_bundle(b, sweep=True, max_threads=1, accuracy=False, save_recommendation=True, **FAST)
    assert res["ok"] and res["recommended"]["provider"] in import_runtime("onnxruntime").module.get_available_providers()
    assert (b / "manifest.json").read_bytes() == before
    assert load_bundle(b).recommended_settings["provider"] == "TensorrtExecutionProvider"
    # another machine (one with CUDA) does not inherit this machine's CPU choice
    rt = import_runtime("onnxruntime")
    gpu = dict(machine_identity(rt), providers=["CPUExecutionProvider", "CUDAExecutionProvider"])
    data = json.loads((b / "recommended.json").read_text())
    assert list(data["machines"]) == [machine_key(machine_identity(rt))] and machine_key(gpu) not in data["machines"]


def test_run_py_bench_writes_recommendation_not_manifest(bundle):
    b = bundle("onnx")
    before = (b / "manifest.json").read_bytes()
    p = run_py(b, "bench", "--warmup", 1, "--warmup-seconds", 0, "--runs", 3, "--min-seconds", 0,
               "--max-threads", 1, "--batch-sizes", 1, "--no-accuracy", "--quiet")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (b / "manifest.json").read_bytes() == before
    assert (b / "recommended.json").is_file()
    assert "saved" in p.stdout and "recommended.json" in p.stdout
    p = run_py(b, "verify", "--no-accuracy")
    assert p.returncode == 0 and "this machine's setting from recommended.json" in p.stdout


def test_edgec_bench_cli_leaves_the_manifest_alone(bundle):
    from typer.testing import CliRunner

    from edgec.cli import app
    b = bundle("onnx")
    before = (b / "manifest.json").read_bytes()
    r = CliRunner().invoke(app, ["bench", str(b), "--runs", "3", "--min-seconds", "0", "--batch-sizes", "1",
                                 "--warmup", "1"])
    assert r.exit_code == 0, r.output
    assert (b / "manifest.json").read_bytes() == before
    assert json.loads((b / "recommended.json").read_text())["machines"]


# ---------------------------------------------------------------------------------------------
# 5. layout: one module per runtime, relative imports only, public names kept
# ---------------------------------------------------------------------------------------------
def test_runtime_modules_and_public_names():
    from edgec.ondevice import runtime_onnx, runtime_tflite, runtimes
    for name in ("Model", "TFLiteModel", "OnnxModel", "RuntimeInfo", "RUNTIMES", "GRAPH_OPT_LEVELS",
                 "SWEEP_ACCELERATORS", "import_runtime", "normalize_settings", "open_model", "settings_id",
                 "sweep_grid", "version_tuple", "provider_name", "onnx_available_providers"):
        assert hasattr(runtimes, name), name
    assert runtimes.TFLiteModel is runtime_tflite.TFLiteModel and runtimes.OnnxModel is runtime_onnx.OnnxModel
    assert runtimes.RUNTIMES == ("tflite", "onnxruntime")


def _top_level_imports(path):
    tree = ast.parse(path.read_text())
    out = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            out += [(a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level))
    return out, tree


def test_ondevice_imports_are_relative_stdlib_or_numpy():
    allowed = set(sys.stdlib_module_names) | {"numpy"}
    for path in sorted(ONDEVICE_DIR.glob("*.py")):
        imports, tree = _top_level_imports(path)
        for module, level in imports:
            if level:
                continue
            assert module.split(".")[0] in allowed, (path.name, module)
        for node in ast.walk(tree):  # nothing imports edgec (the bundle has no edgec package)
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert (node.module or "").split(".")[0] != "edgec", (path.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "edgec" for a in node.names), path.name


# ---------------------------------------------------------------------------------------------
# permissions
# ---------------------------------------------------------------------------------------------
def test_files_written_into_a_bundle_are_readable_by_others_under_a_strict_umask(bundle):
    b = bundle("tflite")
    old = os.umask(0o077)
    try:
        store_recommendation(str(b), "tflite", machine_identity(import_runtime("tflite")), {"threads": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((b / "recommended.json").stat().st_mode) == 0o644
    assert not list(b.glob(".recommended.json.*"))


def test_sha_of_fixture_matches(base_bundles):  # the fixture itself is a valid, fully listed bundle
    b = base_bundles["onnx"]
    m = tod.read_manifest(b)
    for f in m["files"]:
        assert hashlib.sha256((b / f["name"]).read_bytes()).hexdigest() == f["sha256"]
    assert check_files(str(b), m["files"])["ok"]
