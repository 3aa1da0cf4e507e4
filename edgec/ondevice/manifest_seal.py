"""The manifest's self-digest: manifest.json checks itself, without a key.

``self_sha256`` is the sha256 of the manifest's canonical JSON (keys sorted, compact separators,
non-ASCII escaped) with that one field left out. Every writer seals the manifest (``manifest_bytes``)
and every reader checks the seal before it trusts anything else in it (``check_seal``), so a byte
changed in transit (say inside a recorded training config, which no schema check reads) is caught on
an unsigned bundle too. The digest is of the parsed content, not of the bytes: key order and
indentation in the file do not matter. A signature (manifest.sig) is made over the sealed bytes.
Standard library only (the runner is stdlib + numpy).
"""

import hashlib
import json

from .errors import ManifestError, ManifestSealError

SEAL_KEY = "self_sha256"

_REBUILD = "rebuild or re-download the bundle"


def canonical_digest(manifest):
    """sha256 hex of ``manifest`` (a dict) in canonical JSON, without its ``SEAL_KEY``."""
    body = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal(manifest):
    """Set ``manifest[SEAL_KEY]`` to the digest of the rest (in place); returns ``manifest``."""
    manifest[SEAL_KEY] = canonical_digest(manifest)
    return manifest


def manifest_bytes(manifest):
    """The bytes of a sealed manifest.json for ``manifest`` (sealed in place first): what every
    writer writes, and what a signature is made over."""
    seal(manifest)
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def check_seal(manifest):
    """Raise ManifestSealError unless ``manifest`` (a parsed dict) carries the digest of its content."""
    recorded = manifest.get(SEAL_KEY)
    if recorded is None:
        raise ManifestSealError("manifest.json has no %s: the bundle predates self-checking manifests" % SEAL_KEY,
                                "rebuild it with this edgec version")
    try:
        actual = canonical_digest(manifest)
    except RecursionError:
        raise ManifestError("manifest.json is nested too deeply", _REBUILD) from None
    if recorded != actual:
        raise ManifestSealError("manifest.json is corrupted (its self-digest does not match)", _REBUILD)
