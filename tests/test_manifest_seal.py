"""manifest.json checks itself (issue #22 item 16): a byte changed anywhere in it is caught without a key.

One real tiny build (train 1 epoch + export, an MLP for desktop ONNX Runtime) gives a bundle whose
manifest the build wrote and amended (lineage, accuracy budget) through the product's own writers;
the tests copy it and change it, then run ``edgec verify`` and the bundle's own ``run.py verify``.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from edgec.ondevice import ManifestError, load_bundle, verify_bundle
from edgec.ondevice.errors import ManifestSealError
from edgec.ondevice.manifest_seal import SEAL_KEY, canonical_digest, check_seal
from edgec.signing import generate_keypair, sign_bundle
from support import run_cli

TINY = ["--target", "desktop-gpu", "--model", "mlp", "--stages", "train,export", "--epochs", "1"]
CORRUPTED = "manifest.json is corrupted (its self-digest does not match)"
PREDATES = "the bundle predates self-checking manifests"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    base = tmp_path_factory.mktemp("seal")
    run_cli("build", *TINY, "--cache-dir", base / "cache", "--out", base / "out", cwd=base)
    return base / "out" / "desktop-gpu" / "bundle"


@pytest.fixture
def bundle(built, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(built, dst)
    return dst


def run_py(bundle, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    return subprocess.run([sys.executable, "run.py", *map(str, args)], cwd=bundle, capture_output=True, text=True,
                          env=env, timeout=300)


def flip_in_training_config(bundle):
    """Flip one bit of one byte inside a string of the recorded training config: still valid JSON,
    still a valid schema (nothing reads that string), so only the self-digest can notice."""
    path = bundle / "manifest.json"
    raw = path.read_bytes()
    at = raw.index(b'"optimizer": "adam"') + len(b'"optimizer": "ada')
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:])
    assert json.loads(path.read_text())["lineage"][0]["config"]["optimizer"] == "adal"


def assert_refused(bundle, message, *extra):
    """``edgec verify`` and the bundle's ``run.py verify`` both exit 1 with one line saying ``message``."""
    for proc in (run_cli("verify", bundle, *extra, cwd=bundle.parent, check=None), run_py(bundle, "verify", *extra)):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_the_built_manifest_is_sealed_and_verifies(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest[SEAL_KEY] == canonical_digest(manifest)
    assert manifest["lineage"] and "accuracy_budget" in manifest  # written after export: resealed
    assert verify_bundle(str(built))["ok"]
    assert run_py(built, "verify").returncode == 0


def test_a_byte_flipped_in_a_config_string_is_refused(bundle):
    flip_in_training_config(bundle)
    assert_refused(bundle, CORRUPTED)


def test_a_manifest_without_the_self_digest_is_refused(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest[SEAL_KEY]
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    assert_refused(bundle, PREDATES)
    with pytest.raises(ManifestSealError, match="rebuild"):
        load_bundle(str(bundle))


def test_a_self_digest_of_the_wrong_type_is_corruption(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest[SEAL_KEY] = 7
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestSealError, match="corrupted") as ei:
        load_bundle(str(bundle))
    assert ei.value.exit_code == 1


def test_key_order_and_layout_do_not_matter(bundle):
    """The digest is of the content: the same manifest rewritten in reverse key order, compact,
    still verifies; any changed value does not."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    reordered = dict(reversed(list(manifest.items())))
    (bundle / "manifest.json").write_text(json.dumps(reordered, separators=(",", ":")))
    assert load_bundle(str(bundle)).manifest == manifest
    assert canonical_digest(reordered) == canonical_digest(manifest) == manifest[SEAL_KEY]
    changed = json.loads(json.dumps(manifest))
    changed["tolerance"]["atol"] = changed["tolerance"]["atol"] * 2
    with pytest.raises(ManifestSealError):
        check_seal(changed)
    changed = json.loads(json.dumps(manifest))
    changed["extra"] = None  # a key added, even with a null value
    with pytest.raises(ManifestSealError):
        check_seal(changed)


def test_a_signed_bundle_is_resealed_then_signed(bundle, tmp_path):
    """Signing adds cryptography to requirements.txt and updates its file-table entry: the manifest is
    resealed before it is signed, so it verifies with and without the key; a flipped byte then fails
    the signature with the key and the self-digest without it."""
    private, public = generate_keypair(tmp_path / "keys")
    assert "cryptography" not in (bundle / "requirements.txt").read_text()
    sign_bundle(bundle, private)
    assert "cryptography" in (bundle / "requirements.txt").read_text()
    manifest = json.loads((bundle / "manifest.json").read_text())
    check_seal(manifest)
    assert verify_bundle(str(bundle), public_key=str(public))["ok"]
    assert run_py(bundle, "verify", "--public-key", public).returncode == 0
    flip_in_training_config(bundle)
    assert_refused(bundle, CORRUPTED)
    res = verify_bundle(str(bundle), public_key=str(public))
    assert not res["ok"] and "does not match its signature" in res["errors"][0]


def test_the_seal_is_checked_before_the_schema(bundle):
    """A corrupted value the schema would also refuse is reported as corruption (exit 1), not as a
    schema error asking to re-export."""
    raw = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(raw.replace('"name": "onnxruntime"', '"name": "onnxruntimf"', 1))
    with pytest.raises(ManifestError, match="corrupted"):
        load_bundle(str(bundle))
