"""Signed bundles: check ``manifest.sig`` against a public key (Ed25519).

The signature covers the exact bytes of manifest.json, and the manifest lists every file of the
bundle with its sha256 (the runner included); ``verify`` refuses any file the table does not
list. A valid signature plus a passing integrity check therefore vouch for every byte of the
bundle. ``recommended.json`` (advisory, per machine) is the one file outside the signature.

``manifest.sig`` (JSON, ``edgec-signature`` version 1)::

    {"schema": "edgec-signature", "schema_version": 1, "algorithm": "ed25519",
     "signed_file": "manifest.json", "manifest_sha256": HEX,
     "public_key_fingerprint": "sha256:" + sha256(raw 32-byte public key) in hex,
     "signature": base64(64-byte Ed25519 signature of manifest.json's bytes)}

Public keys are read as PEM (``-----BEGIN PUBLIC KEY-----``, what ``edgec keys generate``
writes), OpenSSH (``ssh-ed25519 AAAA...``), the raw 32 bytes, or those as 64 hex digits.

``cryptography`` is imported only here and only when a signature is checked, so a device that
never checks signatures needs numpy and its runtime only.
"""

import base64
import binascii
import hashlib
import json
import os
import stat

from .errors import BundleError, RuntimeMissingError
from .integrity import SIGNATURE_NAME, FileRefused, open_bundle_file

SIGNATURE_SCHEMA = "edgec-signature"
SIGNATURE_SCHEMA_VERSION = 1
ALGORITHM = "ed25519"
MAX_SIGNATURE_BYTES = 64 << 10
MAX_KEY_BYTES = 64 << 10


class KeyFileError(BundleError):
    """The public key file given to check a signature is missing or not an Ed25519 public key."""


def crypto():
    """``(ed25519, serialization, InvalidSignature)`` from cryptography; RuntimeMissingError naming
    the package when it is not installed."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise RuntimeMissingError("checking a bundle signature (--public-key) needs the 'cryptography' package, "
                                  "which is not installed", "pip install cryptography") from None
    return ed25519, serialization, InvalidSignature


def raw_public_bytes(public_key):
    _ed, serialization, _inv = crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key):
    """``sha256:<hex>`` of the raw 32-byte Ed25519 public key."""
    return "sha256:" + hashlib.sha256(raw_public_bytes(public_key)).hexdigest()


def read_key_file(path, max_bytes=MAX_KEY_BYTES):
    """The bytes of a key file, which must be a regular file of at most ``max_bytes``.

    Opened non-blocking and checked with fstat before any read, so a FIFO never blocks and a
    device such as /dev/zero is never read. Raises OSError (cannot open) or ValueError (the reason
    the file is refused, e.g. "is not a regular file")."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("is not a regular file")
        if st.st_size > max_bytes:
            raise ValueError("is not a key (bigger than %d bytes)" % max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after the size check
        raise ValueError("is not a key (bigger than %d bytes)" % max_bytes)
    return data


def load_public_key(path):
    """An Ed25519 public key from ``path`` (PEM, OpenSSH, raw 32 bytes or 64 hex digits)."""
    ed25519, serialization, _inv = crypto()
    path = os.fspath(path)
    hint = "pass the edgec.pub written by `edgec keys generate` (an Ed25519 public key)"
    try:
        data = read_key_file(path)
    except FileNotFoundError:
        raise KeyFileError("public key %s not found" % path, hint) from None
    except OSError as e:
        raise KeyFileError("public key %s cannot be read (%s)" % (path, e.strerror or e), hint) from None
    except ValueError as e:
        raise KeyFileError("public key %s %s" % (path, e), hint) from None
    text = data.strip()
    key = None
    try:
        if b"PRIVATE KEY" in text:
            raise KeyFileError("%s is a private key; verify takes the public key" % path,
                               "pass edgec.pub, not edgec.key (never ship the private key)")
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
        elif text.startswith(b"ssh-ed25519 "):
            key = serialization.load_ssh_public_key(text)
        elif len(data) == 32:
            key = ed25519.Ed25519PublicKey.from_public_bytes(data)
        elif len(text) == 64:
            key = ed25519.Ed25519PublicKey.from_public_bytes(binascii.unhexlify(text))
    except KeyFileError:
        raise
    except Exception as e:
        raise KeyFileError("%s is not a readable public key (%s)" % (path, str(e).splitlines()[0][:120] if str(e)
                                                                    else type(e).__name__), hint) from None
    if key is None or not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError("%s is not an Ed25519 public key" % path, hint)
    return key


def read_signature(bundle_path):
    """The parsed manifest.sig of a bundle; None when there is none. ValueError naming the problem
    when it is malformed."""
    try:
        f, _size = open_bundle_file(bundle_path, SIGNATURE_NAME, MAX_SIGNATURE_BYTES, "signature")
    except FileNotFoundError:
        return None
    except FileRefused as e:
        raise ValueError("%s is %s" % (SIGNATURE_NAME, {"symlink": "a symlink", "too-big": "too big"}.get(
            e.problem, "not a regular file"))) from None
    except OSError as e:
        raise ValueError("%s cannot be read (%s)" % (SIGNATURE_NAME, e.strerror or e)) from None
    with f:
        raw = f.read(MAX_SIGNATURE_BYTES + 1)
    try:
        sig = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("%s is not valid JSON" % SIGNATURE_NAME) from None
    if not isinstance(sig, dict) or sig.get("schema") != SIGNATURE_SCHEMA:
        raise ValueError("%s is not an edgec signature" % SIGNATURE_NAME)
    if sig.get("schema_version") != SIGNATURE_SCHEMA_VERSION or sig.get("algorithm") != ALGORITHM:
        raise ValueError("%s uses schema_version %r / algorithm %r; this runner checks version %d / %s"
                         % (SIGNATURE_NAME, sig.get("schema_version"), str(sig.get("algorithm"))[:20],
                            SIGNATURE_SCHEMA_VERSION, ALGORITHM))
    if sig.get("signed_file") != "manifest.json":
        raise ValueError("%s does not sign manifest.json" % SIGNATURE_NAME)
    fp = sig.get("public_key_fingerprint")
    if not isinstance(fp, str) or not fp.startswith("sha256:") or len(fp) != 71:
        raise ValueError("%s has no valid public_key_fingerprint" % SIGNATURE_NAME)
    try:
        value = base64.b64decode(str(sig.get("signature")), validate=True)
    except (binascii.Error, ValueError):
        value = b""
    if len(value) != 64:
        raise ValueError("%s has no valid Ed25519 signature (64 bytes, base64)" % SIGNATURE_NAME)
    sig["signature_bytes"] = value
    return sig


def check_signature(manifest_bytes, bundle_path, public_key_path):
    """Check ``manifest_bytes`` (the exact bytes of the bundle's manifest.json) against its
    manifest.sig and the public key at ``public_key_path``.

    Returns ``{"ok", "signed", "detail", "key_fingerprint", "signer_fingerprint"}``; ``ok`` is False
    for an unsigned bundle, one signed by another key, or a manifest changed after signing.
    Raises KeyFileError (bad key file) or RuntimeMissingError (no cryptography)."""
    _ed, _ser, InvalidSignature = crypto()
    key = load_public_key(public_key_path)
    fp = fingerprint(key)
    res = {"ok": False, "signed": False, "detail": None, "key_fingerprint": fp, "signer_fingerprint": None}
    try:
        sig = read_signature(bundle_path)
    except ValueError as e:
        res["detail"] = str(e)
        return res
    if sig is None:
        res["detail"] = "the bundle is not signed (no %s)" % SIGNATURE_NAME
        return res
    res["signed"] = True
    res["signer_fingerprint"] = sig["public_key_fingerprint"]
    if sig["public_key_fingerprint"] != fp:
        res["detail"] = "the bundle was signed by another key (%s..., not the given %s...)" % (
            sig["public_key_fingerprint"][:23], fp[:23])
        return res
    try:
        key.verify(sig["signature_bytes"], bytes(manifest_bytes))
    except InvalidSignature:
        res["detail"] = ("manifest.json does not match its signature by this key: it was changed after signing "
                         "(or manifest.sig was made with another key)")
        return res
    res["ok"] = True
    res["detail"] = "manifest.json signed by %s... (Ed25519)" % fp[:23]
    return res
