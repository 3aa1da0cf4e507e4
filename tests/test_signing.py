"""Signed bundles: `edgec keys generate`, `edgec.signing.sign_bundle`, `verify --public-key` on the host,
in run.py on the device, and under qemu (emulated arm64 Raspberry Pi OS).

Bundles come from tests/test_ondevice.py's builder (tiny digits MLP, real runtimes).
"""

import base64
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import test_ondevice as tod
from edgec.cli import app
from edgec.base.errors import ConfigError, InputError
from edgec.ondevice import IntegrityError, KeyFileError, RuntimeMissingError, bench_bundle, verify_bundle
from edgec.ondevice.manifest_seal import SEAL_KEY, check_seal, manifest_bytes
from edgec.signing import CRYPTOGRAPHY_REQUIREMENT, generate_keypair, sign_bundle

FAST = dict(warmup=1, warmup_seconds=0.0, runs=3, min_seconds=0.0, max_seconds=2.0, batch_sizes=(1,))


@pytest.fixture(scope="module")
def base_bundles(tmp_path_factory):
    pytest.importorskip("litert_torch")
    pytest.importorskip("onnxruntime")
    base = tmp_path_factory.mktemp("signing")
    model, train_raw, eval_raw, eval_y = tod._train_digits_mlp()
    return {k: tod._build_bundle(k, base / k, model, train_raw, eval_raw, eval_y) for k in ("onnx", "tflite-int8")}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(d / "ours")
    other_private, other_public = generate_keypair(d / "theirs")
    return {"private": private, "public": public, "other_private": other_private, "other_public": other_public}


@pytest.fixture(scope="module")
def signed(base_bundles, keys, tmp_path_factory):
    """Signed copies of the fixture bundles (never modified by tests: copy them first)."""
    base = tmp_path_factory.mktemp("signed")
    out = {}
    for kind, b in base_bundles.items():
        dst = base / kind
        shutil.copytree(b, dst)
        sign_bundle(dst, keys["private"])
        out[kind] = dst
    return out


@pytest.fixture
def copy_signed(signed, tmp_path):
    def make(kind="onnx", name=None):
        dst = tmp_path / (name or kind)
        shutil.copytree(signed[kind], dst)
        return dst
    return make


def run_py(bundle, *args, env_extra=None, importtime=False):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(env_extra or {})
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + ["run.py", *map(str, args)]
    return subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, env=env, timeout=300)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------
def test_keys_generate_writes_a_private_0600_and_a_public_key(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    old = os.umask(0o022)
    try:
        r = cli("keys", "generate", "--out", tmp_path / "k")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    private, public = tmp_path / "k" / "edgec.key", tmp_path / "k" / "edgec.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    pub = serialization.load_pem_public_key(public.read_bytes())
    assert isinstance(key, ed25519.Ed25519PrivateKey) and isinstance(pub, ed25519.Ed25519PublicKey)
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert "sha256:" in r.output
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(tmp_path / "k")
    before = private.read_bytes()
    generate_keypair(tmp_path / "k", force=True)
    assert private.read_bytes() != before and stat.S_IMODE(private.stat().st_mode) == 0o600


def test_keys_generate_never_writes_through_a_symlink(tmp_path):
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "edgec.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(tmp_path / "k")
    assert not (tmp_path / "elsewhere").exists()


# ---------------------------------------------------------------------------------------------
# sign_bundle
# ---------------------------------------------------------------------------------------------
def test_sign_bundle_writes_signature_and_requirement(signed, base_bundles, keys):
    b = signed["onnx"]
    sig = json.loads((b / "manifest.sig").read_text())
    raw = (b / "manifest.json").read_bytes()
    assert sig["schema"] == "edgec-signature" and sig["algorithm"] == "ed25519" and sig["signed_file"] == "manifest.json"
    assert sig["public_key_fingerprint"].startswith("sha256:") and len(base64.b64decode(sig["signature"])) == 64
    from cryptography.hazmat.primitives import serialization
    pub = serialization.load_pem_public_key(keys["public"].read_bytes())
    pub.verify(base64.b64decode(sig["signature"]), raw)  # the exact bytes of manifest.json
    reqs = (b / "requirements.txt").read_text().splitlines()
    assert reqs[-1] == CRYPTOGRAPHY_REQUIREMENT and reqs[:-1] == (base_bundles["onnx"] / "requirements.txt").read_text().splitlines()
    entry = [f for f in json.loads(raw)["files"] if f["name"] == "requirements.txt"][0]
    assert entry["bytes"] == (b / "requirements.txt").stat().st_size
    # nothing else in the manifest changed, and its self-digest was recomputed over the new file table
    before, after = tod.read_manifest(base_bundles["onnx"]), json.loads(raw)
    same = ("files", SEAL_KEY)
    assert {k: v for k, v in before.items() if k not in same} == {k: v for k, v in after.items() if k not in same}
    check_seal(after)
    for name in ("manifest.sig", "manifest.json", "requirements.txt"):
        assert stat.S_IMODE((b / name).stat().st_mode) & 0o044 == 0o044, name


def test_signing_twice_is_idempotent(copy_signed, keys):
    b = copy_signed()
    files = {p.name: p.read_bytes() for p in (b / "manifest.json", b / "manifest.sig", b / "requirements.txt")}
    sign_bundle(b, keys["private"])  # Ed25519 is deterministic, cryptography is already required
    assert files == {p.name: p.read_bytes() for p in (b / "manifest.json", b / "manifest.sig", b / "requirements.txt")}


def test_sign_bundle_under_strict_umask_keeps_bundle_files_readable(base_bundles, keys, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(base_bundles["onnx"], b)
    old = os.umask(0o077)
    try:
        sign_bundle(b, keys["private"])
    finally:
        os.umask(old)
    for name in ("manifest.sig", "manifest.json", "requirements.txt"):
        assert stat.S_IMODE((b / name).stat().st_mode) == 0o644, name
    assert not [p for p in b.iterdir() if p.name.startswith(".")]


def test_sign_bundle_refuses_a_bundle_that_is_not_intact_and_bad_keys(base_bundles, keys, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(base_bundles["onnx"], b)
    (b / "extra.py").write_text("print('hi')\n")
    with pytest.raises(IntegrityError, match="extra.py"):
        sign_bundle(b, keys["private"])
    assert not (b / "manifest.sig").exists()
    (b / "extra.py").unlink()
    with pytest.raises(InputError, match="not a private key"):
        sign_bundle(b, keys["public"])
    with pytest.raises(InputError, match="cannot be read"):
        sign_bundle(b, tmp_path / "missing.key")


# ---------------------------------------------------------------------------------------------
# verify --public-key: host API and CLI
# ---------------------------------------------------------------------------------------------
def _failed(res, text):
    assert not res["ok"], res
    assert any(text in e for e in res["errors"]), res["errors"]


def test_signed_bundle_verifies(signed, keys):
    res = verify_bundle(signed["onnx"], public_key=keys["public"])
    assert res["ok"], res["errors"]
    assert [c["name"] for c in res["checks"]] == ["signature", "integrity", "load", "test_vectors", "accuracy"]
    assert res["signature"]["ok"] and res["signature"]["signer_fingerprint"] == res["signature"]["key_fingerprint"]
    plain = verify_bundle(signed["onnx"])  # without a key: verified as before, with a note
    assert plain["ok"] and any("--public-key" in n for n in plain["notes"])


def test_unsigned_bundle_is_refused(base_bundles, keys):
    res = verify_bundle(base_bundles["onnx"], public_key=keys["public"])
    _failed(res, "not signed")
    assert [c["skipped"] for c in res["checks"][1:]] == [True, True, True, True]


def test_bundle_signed_by_another_key_is_refused(signed, keys):
    _failed(verify_bundle(signed["onnx"], public_key=keys["other_public"]), "signed by another key")


def test_resigned_by_attacker_with_victim_fingerprint_is_refused(copy_signed, keys):
    b = copy_signed()
    victim = verify_bundle(b, public_key=keys["public"], check_accuracy=False)["signature"]["key_fingerprint"]
    sign_bundle(b, keys["other_private"])
    sig = json.loads((b / "manifest.sig").read_text())
    sig["public_key_fingerprint"] = victim  # claims to be ours
    (b / "manifest.sig").write_text(json.dumps(sig))
    _failed(verify_bundle(b, public_key=keys["public"]), "does not match its signature")


@pytest.mark.parametrize("change", ["accuracy", "files", "not-json", "whitespace"])
def test_tampered_manifest_is_refused(copy_signed, keys, change):
    b = copy_signed()
    text = (b / "manifest.json").read_text()
    if change == "accuracy":  # resealed: the self-digest is no secret, the signature is what refuses it
        m = json.loads(text)
        m["metrics"]["accuracy"] = 1.0
        text = manifest_bytes(m).decode()
    elif change == "files":  # drop a file from the table and delete it: integrity alone would pass
        m = json.loads(text)
        m["files"] = [f for f in m["files"] if f["name"] != "labels.txt"]
        (b / "labels.txt").unlink()
        text = manifest_bytes(m).decode()
    elif change == "not-json":
        text = text[:-10]
    else:
        text = text + " "
    (b / "manifest.json").write_text(text)
    _failed(verify_bundle(b, public_key=keys["public"]), "does not match its signature")


@pytest.mark.parametrize("how", ["flip", "add", "remove", "runner"])
def test_tampered_added_or_removed_file_is_refused(copy_signed, keys, how):
    b = copy_signed()
    if how == "flip":
        tod.flip_byte(b / "model.onnx")
        want = "model.onnx sha256 mismatch"
    elif how == "add":
        (b / "edgec_ondevice" / "sitecustomize.py").write_text("import os\n")
        want = "edgec_ondevice/sitecustomize.py is not listed"
    elif how == "remove":
        (b / "eval.npz").unlink()
        want = "eval.npz is missing"
    else:
        p = b / "run.py"
        p.write_text(p.read_text().replace("sys.exit(main(", "sys.exit(0 or main(", 1))
        want = "run.py"
    res = verify_bundle(b, public_key=keys["public"])
    assert res["checks"][0]["name"] == "signature" and res["checks"][0]["ok"]
    _failed(res, want)


@pytest.mark.parametrize("content", [b"garbage", b"{}", json.dumps({"schema": "edgec-signature", "schema_version": 1,
                                                                      "algorithm": "rsa"}).encode()])
def test_malformed_signature_file_is_refused(copy_signed, keys, content):
    b = copy_signed()
    (b / "manifest.sig").write_bytes(content)
    res = verify_bundle(b, public_key=keys["public"])
    assert not res["ok"] and res["errors"][0].startswith("signature: manifest.sig")


def test_bad_key_files_are_usage_errors(signed, keys, tmp_path):
    (tmp_path / "not-a-key.pub").write_text("hello\n")
    for path, match in ((tmp_path / "not-a-key.pub", "not an Ed25519 public key"),
                        (keys["private"], "is a private key"), (tmp_path / "missing.pub", "not found")):
        with pytest.raises(KeyFileError, match=match) as ei:
            verify_bundle(signed["onnx"], public_key=path)
        assert ei.value.exit_code == 2


def test_public_key_formats(signed, keys, tmp_path):
    from cryptography.hazmat.primitives import serialization
    pub = serialization.load_pem_public_key(keys["public"].read_bytes())
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ssh = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    for name, data in (("raw.pub", raw), ("hex.pub", raw.hex().encode() + b"\n"), ("ssh.pub", ssh + b" me@host\n")):
        (tmp_path / name).write_bytes(data)
        assert verify_bundle(signed["onnx"], public_key=tmp_path / name, check_accuracy=False)["ok"], name


def test_cli_verify_public_key_exit_codes(signed, base_bundles, keys, tmp_path):
    r = cli("verify", signed["onnx"], "--public-key", keys["public"])
    assert r.exit_code == 0, r.output
    assert "signature" in r.output
    for bundle, key in ((base_bundles["onnx"], keys["public"]), (signed["onnx"], keys["other_public"])):
        r = cli("verify", bundle, "--public-key", key)
        assert r.exit_code == 1 and isinstance(r.exception, Exception)
    from edgec.base.errors import RunError
    assert isinstance(cli("verify", base_bundles["onnx"], "--public-key", keys["public"]).exception, RunError)


def test_bench_after_signing_keeps_the_signature_valid(copy_signed, keys):
    b = copy_signed()
    res = bench_bundle(b, sweep=True, max_threads=1, accuracy=False, save_recommendation=True, **FAST)
    assert res["ok"] and (b / "recommended.json").is_file()
    assert verify_bundle(b, public_key=keys["public"], check_accuracy=False)["ok"]


# ---------------------------------------------------------------------------------------------
# run.py verify --public-key (numpy + runtime + cryptography, from the bundle alone)
# ---------------------------------------------------------------------------------------------
def test_run_py_verify_public_key(copy_signed, keys):
    b = copy_signed("tflite-int8")
    p = run_py(b, "verify", "--public-key", keys["public"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "signature" in p.stdout and "edgec verify: OK" in p.stdout
    p = run_py(b, "verify", "--public-key", keys["other_public"])
    assert p.returncode == 1 and "signed by another key" in p.stderr
    tod.flip_byte(b / "labels.txt")
    p = run_py(b, "verify", "--public-key", keys["public"])
    assert p.returncode == 1 and "labels.txt" in p.stderr and "Traceback" not in p.stderr


def test_run_py_without_public_key_does_not_import_cryptography(copy_signed):
    b = copy_signed("tflite-int8")
    p = run_py(b, "verify", "--no-accuracy", importtime=True)
    assert p.returncode == 0, p.stderr[-2000:]
    mods = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in p.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}
    assert "numpy" in mods and "cryptography" not in mods


def test_run_py_public_key_without_cryptography_names_the_package(copy_signed, keys, tmp_path):
    b = copy_signed("onnx")
    fake = tmp_path / "no-crypto" / "cryptography"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('cryptography is not installed here')\n")
    p = run_py(b, "verify", "--public-key", keys["public"], env_extra={"PYTHONPATH": str(fake.parent)})
    assert p.returncode == 2, p.stderr
    assert "cryptography" in p.stderr and "pip install cryptography" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    with pytest.raises(RuntimeMissingError):  # the same in-process
        import builtins
        real = builtins.__import__

        def no_crypto(name, *a, **k):
            if name.startswith("cryptography"):
                raise ImportError(name)
            return real(name, *a, **k)
        builtins.__import__ = no_crypto
        try:
            verify_bundle(b, public_key=keys["public"])
        finally:
            builtins.__import__ = real


# ---------------------------------------------------------------------------------------------
# emulated arm64 (Raspberry Pi OS bookworm, Python 3.11, under qemu-user)
# ---------------------------------------------------------------------------------------------
# arm64_cache: tests/conftest.py
def test_emulated_arm64_verify_checks_the_signature(arm64_cache, copy_signed, keys):
    from edgec.base.emulation import verify_bundle_emulated
    b = copy_signed("tflite-int8")
    files_before = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    res = verify_bundle_emulated(b, arm64_cache, "ai-edge-litert", exact=False, public_key=keys["public"])
    assert res["ok"], res.get("errors")
    assert res["emulation"]["machine"] == "aarch64" and res["emulation"]["extras"]["cryptography"]
    assert res["checks"][0]["name"] == "signature" and res["checks"][0]["ok"]
    assert {p: p.read_bytes() for p in b.rglob("*") if p.is_file()} == files_before
    res = verify_bundle_emulated(b, arm64_cache, "ai-edge-litert", exact=False, public_key=keys["other_public"])
    assert not res["ok"] and res["emulation"]["exit_code"] == 1
    assert any("signed by another key" in e for e in res["errors"])
    m = json.loads((b / "manifest.json").read_text())
    m["metrics"]["accuracy"] = 1.0
    (b / "manifest.json").write_bytes(manifest_bytes(m))
    res = verify_bundle_emulated(b, arm64_cache, "ai-edge-litert", exact=False, public_key=keys["public"])
    assert not res["ok"] and any("does not match its signature" in e for e in res["errors"])
