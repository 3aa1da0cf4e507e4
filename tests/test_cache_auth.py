"""Cache authentication: whoever can write the stage cache but lacks its key cannot get a byte
served, published or signed (issue 22 item 3). Each forgery recomputes every hash and digest the
cache records, so only the MAC stands between it and a signed bundle."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from support import reseal_manifest, run_cli

from edgec.base.errors import InputError
from edgec.pipeline.artifact import MODEL
from edgec.pipeline.cache import ENTRY_FILE, StageCache, stable_hash
from edgec.pipeline.cache_auth import KEY_BYTES, KEY_ENV, load_cache_key
from edgec.signing import generate_keypair

TINY = ["--target", "desktop-gpu", "--model", "mlp", "--stages", "train,export", "--epochs", "1"]
FORGED_RUNNER = b"print('not built by edgec')\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry(cache: Path, stage: str) -> Path:
    (entry,) = [p for p in (cache / stage).iterdir() if not p.name.startswith(".")]
    return entry


def _rewrite_entry(entry: Path, **changes) -> None:
    """What a cache writer without the key can do: change entry.json and recompute its file table
    and digest from the files on disk."""
    record = json.loads((entry / ENTRY_FILE).read_text())
    record.update(changes)
    record["files"] = {p.relative_to(entry).as_posix(): _sha(p.read_bytes())
                       for p in sorted(entry.rglob("*")) if p.is_file() and p.name != ENTRY_FILE}
    record["digest"] = stable_hash({"kind": record["kind"], "files": record["files"]})
    (entry / ENTRY_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))


def _forge_runner(entry: Path) -> None:
    """Replace the export entry's run.py and fix the bundle manifest's hash of it."""
    (entry / "run.py").write_bytes(FORGED_RUNNER)
    manifest = json.loads((entry / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["name"] == "run.py":
            f.update(sha256=_sha(FORGED_RUNNER), bytes=len(FORGED_RUNNER))
    (entry / "manifest.json").write_text(json.dumps(manifest, indent=2))
    reseal_manifest(entry)  # the self-digest is no secret: a forger recomputes it too
    _rewrite_entry(entry)


def _build(cwd: Path, cache: Path, out: Path, env: dict, *extra, check=0):
    proc = run_cli("build", *TINY, *extra, "--cache-dir", cache, "--out", out, "--json", cwd=cwd, env=env, check=check)
    return proc, (json.loads(proc.stdout) if check == 0 else None)


def _cached(summary: dict) -> dict[str, bool]:
    return {s["id"]: s["cached"] for s in summary["stages"]}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One tiny build into a cache keyed by a shared key file, and a signing key pair."""
    base = tmp_path_factory.mktemp("auth")
    key = base / "shared.key"
    key.write_bytes(os.urandom(KEY_BYTES))
    key.chmod(0o600)
    env = {KEY_ENV: str(key), "XDG_CONFIG_HOME": str(base / "user-a")}
    generate_keypair(base / "keys")
    _, summary = _build(base, base / "cache", base / "out", env)
    return {"base": base, "env": env, "cache": base / "cache", "summary": summary,
            "sign": base / "keys" / "edgec.key"}


@pytest.fixture
def cache_copy(shared, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(shared["cache"], dst, symlinks=True)
    return dst


def test_a_second_user_with_the_shared_key_is_served_everything(shared, cache_copy, tmp_path):
    env = {**shared["env"], "XDG_CONFIG_HOME": str(tmp_path / "user-b")}
    _, summary = _build(tmp_path, cache_copy, tmp_path / "out", env)
    assert all(_cached(summary).values())


def test_an_entry_under_another_key_is_not_served(shared, cache_copy, tmp_path):
    env = {KEY_ENV: "", "XDG_CONFIG_HOME": str(tmp_path / "user-c")}  # own key, created on first use
    proc, summary = _build(tmp_path, cache_copy, tmp_path / "out", env)
    assert not any(_cached(summary).values())
    assert "refused" in proc.stderr and "not authenticated" in proc.stderr
    assert (tmp_path / "user-c" / "edgec" / "cache.key").stat().st_mode & 0o777 == 0o600


def test_an_edited_runner_with_recomputed_hashes_is_not_published_or_signed(shared, cache_copy, tmp_path):
    _forge_runner(_entry(cache_copy, "export"))
    _, summary = _build(tmp_path, cache_copy, tmp_path / "out", shared["env"], "--sign-key", shared["sign"])
    assert _cached(summary) == {"train": True, "export": False}
    bundle = tmp_path / "out" / "desktop-gpu" / "bundle"
    assert (bundle / "run.py").read_bytes() != FORGED_RUNNER and (bundle / "manifest.sig").is_file()
    assert (_entry(cache_copy, "export") / "run.py").read_bytes() != FORGED_RUNNER  # rebuilt in place


def test_an_entry_copied_under_another_key_is_not_served(shared, cache_copy, tmp_path):
    # The 2-epoch config's train key, from a throwaway cache.
    _, other = _build(tmp_path, tmp_path / "scratch", tmp_path / "scratch-out", shared["env"], "--epochs", "2",
                      "--stages", "train")
    key2 = other["stages"][0]["key"]
    one_epoch = _entry(cache_copy, "train")
    shutil.copytree(one_epoch, cache_copy / "train" / key2)
    _rewrite_entry(cache_copy / "train" / key2, key=key2)
    _, summary = _build(tmp_path, cache_copy, tmp_path / "out", shared["env"], "--epochs", "2",
                        "--sign-key", shared["sign"])
    assert _cached(summary) == {"train": False, "export": False}
    assert summary["stages"][0]["info"] != shared["summary"]["stages"][0]["info"]


def test_edited_info_is_not_served(shared, cache_copy, tmp_path):
    entry = _entry(cache_copy, "export")
    record = json.loads((entry / ENTRY_FILE).read_text())
    _rewrite_entry(entry, info={**record["info"], "forged": 0.999})
    _, summary = _build(tmp_path, cache_copy, tmp_path / "out", shared["env"], "--sign-key", shared["sign"])
    assert _cached(summary) == {"train": True, "export": False}
    assert "forged" not in (tmp_path / "out" / "desktop-gpu" / "build.json").read_text()


# -- the StageCache itself (no build) ----------------------------------------------------------


def _put(cache: StageCache, key: str = "k") -> None:
    cache.put("train", key, MODEL, lambda out: (out / "model.pt").write_bytes(b"weights") and {"accuracy": 0.5})


def test_cache_entries_verify_only_under_their_key(tmp_path):
    _put(StageCache(tmp_path, key=b"a" * KEY_BYTES))
    assert StageCache(tmp_path, key=b"a" * KEY_BYTES).get("train", "k") is not None
    refused = []
    other = StageCache(tmp_path, key=b"b" * KEY_BYTES, on_discard=lambda *args: refused.append(args))
    assert other.get("train", "k") is None and "not authenticated" in refused[0][2]
    assert not (tmp_path / "train" / "k").exists()  # discarded, rebuilt by the next put


def test_an_entry_without_a_mac_is_a_miss(tmp_path):
    key = b"a" * KEY_BYTES
    _put(StageCache(tmp_path, key=key))
    entry = tmp_path / "train" / "k"
    record = json.loads((entry / ENTRY_FILE).read_text())
    del record["mac"]  # what an older edgec wrote
    (entry / ENTRY_FILE).write_text(json.dumps(record))
    cache = StageCache(tmp_path, key=key)
    assert cache.get("train", "k") is None and "no MAC" in cache.last_discard_reason


def test_a_file_swapped_after_get_is_never_read(tmp_path):
    from edgec.pipeline.artifact import ChangedInCache

    key = b"a" * KEY_BYTES
    _put(StageCache(tmp_path, key=key))
    artifact = StageCache(tmp_path, key=key).get("train", "k")
    (artifact.path / "model.pt").write_bytes(b"swapped")
    with pytest.raises(ChangedInCache, match="changed in the stage cache"):
        artifact.checkpoint()


# -- the key file ------------------------------------------------------------------------------


def test_default_key_is_created_once_0600(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    first = load_cache_key()
    path = tmp_path / "cfg" / "edgec" / "cache.key"
    assert len(first) == KEY_BYTES and path.stat().st_mode & 0o777 == 0o600
    assert load_cache_key() == first


@pytest.mark.parametrize("case", ["missing", "short", "long", "symlink", "folder", "unreadable"])
def test_a_bad_shared_key_file_is_one_clear_error(tmp_path, monkeypatch, case):
    path = tmp_path / "shared.key"
    if case == "short":
        path.write_bytes(b"x" * (KEY_BYTES - 1))
    elif case == "long":
        path.write_bytes(b"x" * (KEY_BYTES + 1))
    elif case == "symlink":
        (tmp_path / "real.key").write_bytes(b"x" * KEY_BYTES)
        path.symlink_to(tmp_path / "real.key")
    elif case == "folder":
        path.mkdir()
    elif case == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        path.write_bytes(b"x" * KEY_BYTES)
        path.chmod(0)
    monkeypatch.setenv(KEY_ENV, str(path))
    words = {"missing": "does not exist", "short": "not a cache key", "long": "not a cache key", "symlink": "symlink",
             "folder": "not a regular file", "unreadable": "cannot read"}[case]
    with pytest.raises(InputError, match=words):
        load_cache_key()
    assert not os.path.lexists(path) if case == "missing" else True  # never created


def test_no_usable_config_home_asks_for_a_key_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/cfg")
    monkeypatch.setenv("HOME", "")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=KEY_ENV):
        load_cache_key()
    assert not any(tmp_path.iterdir())


def test_cli_bad_key_file_exits_2_in_one_line(tmp_path):
    (tmp_path / "k").write_bytes(b"short")
    proc = run_cli("build", *TINY, "--out", tmp_path / "out", cwd=tmp_path, env={KEY_ENV: str(tmp_path / "k")}, check=2)
    assert proc.stderr.strip().count("\n") == 0 and "not a cache key" in proc.stderr
    assert not (tmp_path / "out").exists()
