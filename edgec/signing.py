"""Signed bundles (host side): Ed25519 key pairs and ``manifest.sig``.

``generate_keypair(out_dir)`` writes ``edgec.key`` (the private key: PKCS#8 PEM, unencrypted, mode
0600; keep it off devices and out of version control) and ``edgec.pub`` (the public key:
SubjectPublicKeyInfo PEM, mode 0644; give it to whoever verifies bundles).

``sign_bundle(bundle_dir, private_key_path)`` signs the exact bytes of the bundle's manifest.json,
which lists every file of the bundle with its sha256 (the on-device runner included), into
``manifest.sig`` (format: ``edgec.ondevice.signature``). Checking the signature on a device needs
the ``cryptography`` package there, so signing first adds it to the bundle's requirements.txt and
updates that file's entry in the manifest's file table (and reseals the manifest's self-digest).
Everything else in the manifest is left exactly as it is, so call it last, once the manifest is
final (lineage written).

``edgec verify BUNDLE --public-key edgec.pub`` and, on the device, ``python run.py verify
--public-key edgec.pub`` then refuse an unsigned bundle, one signed by another key, a changed
manifest, and any file changed, added or removed after signing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

from edgec.base.errors import ConfigError, InputError
from edgec.ondevice.errors import BundleError
from edgec.ondevice.integrity import MANIFEST_NAME, SIGNATURE_NAME, describe_files
from edgec.ondevice.manifest import load_bundle, read_manifest_bytes
from edgec.ondevice.manifest_seal import manifest_bytes
from edgec.ondevice.recommend import write_file_atomic
from edgec.ondevice.signature import ALGORITHM, SIGNATURE_SCHEMA, SIGNATURE_SCHEMA_VERSION, fingerprint, read_key_file

PRIVATE_KEY_NAME = "edgec.key"
PUBLIC_KEY_NAME = "edgec.pub"
REQUIREMENTS_NAME = "requirements.txt"
# What a device needs to check a signature (Ed25519 through cryptography's OpenSSL bindings).
CRYPTOGRAPHY_REQUIREMENT = "cryptography>=42"
BUNDLE_FILE_MODE = 0o644  # bundle files stay readable by whoever copies or verifies the bundle
MAX_KEY_BYTES = 64 << 10


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # a dependency of edgec; only a broken install lacks it
        raise InputError("signing needs the 'cryptography' package: pip install cryptography") from None
    return ed25519, serialization


def generate_keypair(out_dir: Path, force: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into ``out_dir``: ``edgec.key`` (private, 0600) and ``edgec.pub``.

    Refuses (ConfigError) to overwrite an existing key unless ``force``."""
    ed25519, serialization = _crypto()
    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out_dir}: cannot create the folder ({e.strerror})") from None
    private_path, public_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if (path.exists() or path.is_symlink()) and not force:
            raise ConfigError(f"{path} already exists: choose another --out folder (or --force to replace the key pair)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        for path in (private_path, public_path):
            if force and (path.exists() or path.is_symlink()):
                path.unlink()
        # O_EXCL + O_NOFOLLOW: never write through a symlink or into a file someone else prepared
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(private_pem)
        fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(public_pem)
    except OSError as e:
        raise ConfigError(f"--out {out_dir}: cannot write the key pair ({e.strerror or e})") from None
    return private_path, public_path


def load_private_key(path: Path):
    """An Ed25519 private key from a PEM file (what ``generate_keypair`` writes)."""
    ed25519, serialization = _crypto()
    path = Path(path).expanduser()
    try:
        data = read_key_file(path, MAX_KEY_BYTES)
    except OSError as e:
        raise InputError(f"signing key {path} cannot be read ({e.strerror or e}): make one with `edgec keys generate`") from None
    except ValueError as e:
        raise InputError(f"signing key {path} {e}: sign with the edgec.key written by `edgec keys generate`") from None
    if b"PRIVATE KEY" not in data:
        raise InputError(f"{path} is not a private key (PEM): sign with the edgec.key written by `edgec keys generate`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path} is not a readable unencrypted private key ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(f"{path} is not an Ed25519 private key: make one with `edgec keys generate`")
    return key


def _requirement_name(line: str) -> str:
    line = line.split("#", 1)[0].split(";", 1)[0].strip()
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else ""


def _with_cryptography(text: str) -> str | None:
    """requirements.txt text with cryptography added, or None when it already asks for it."""
    if any(_requirement_name(line) == "cryptography" for line in text.splitlines()):
        return None
    if text and not text.endswith("\n"):
        text += "\n"
    return text + CRYPTOGRAPHY_REQUIREMENT + "\n"


def sign_bundle(bundle_dir: Path, private_key_path: Path) -> None:
    """Sign the bundle: add cryptography to requirements.txt (and update its entry in the
    manifest's file table), then write ``manifest.sig`` over the exact bytes of manifest.json.

    The bundle must be intact first (every listed file matches, no unlisted file): a signature
    vouches for what the manifest lists. Raises InputError (bad key) or the bundle's own errors
    (BundleError: not a bundle, bad manifest, IntegrityError)."""
    bundle_dir = Path(bundle_dir)
    key = load_private_key(private_key_path)
    bundle = load_bundle(str(bundle_dir))
    bundle.require_intact()
    raw = read_manifest_bytes(str(bundle_dir))
    manifest = json.loads(raw)

    req_path = bundle_dir / REQUIREMENTS_NAME
    current = req_path.read_text(encoding="utf-8") if req_path.is_file() else ""
    updated = _with_cryptography(current)
    if updated is not None:
        write_file_atomic(str(req_path), updated.encode("utf-8"), mode=BUNDLE_FILE_MODE)
        entry = describe_files(str(bundle_dir), [REQUIREMENTS_NAME])[0]
        files = [f for f in manifest["files"] if f["name"] != REQUIREMENTS_NAME] + [entry]
        manifest["files"] = sorted(files, key=lambda f: f["name"])
        raw = manifest_bytes(manifest)  # resealed: its self-digest covers the new entry
        write_file_atomic(str(bundle_dir / MANIFEST_NAME), raw, mode=BUNDLE_FILE_MODE)

    public = key.public_key()
    signature = {
        "schema": SIGNATURE_SCHEMA,
        "schema_version": SIGNATURE_SCHEMA_VERSION,
        "algorithm": ALGORITHM,
        "signed_file": MANIFEST_NAME,
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "public_key_fingerprint": fingerprint(public),
        "signature": base64.b64encode(key.sign(raw)).decode("ascii"),
    }
    write_file_atomic(str(bundle_dir / SIGNATURE_NAME),
                      (json.dumps(signature, indent=2, sort_keys=True) + "\n").encode("utf-8"), mode=BUNDLE_FILE_MODE)
    # The manifest on disk must be what was signed (nothing else wrote it meanwhile).
    if read_manifest_bytes(str(bundle_dir)) != raw:
        raise BundleError(f"{bundle_dir / MANIFEST_NAME} changed while it was being signed", "sign it again")


def public_key_fingerprint(public_key_path: Path) -> str:
    """``sha256:<hex>`` of a public key file (what manifest.sig records as its signer)."""
    from edgec.ondevice.signature import load_public_key

    return fingerprint(load_public_key(public_key_path))
