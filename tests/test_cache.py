import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

import edgec.pipeline.cache as cache_mod
import edgec.pipeline.publish as publish_mod
from edgec.pipeline.cache import ENTRY_FILE, StageCache, sha256_file, stable_hash
from edgec.pipeline.publish import collect_stale, make_temp_dir, publish_directory


def write(payload):
    def build(out):
        (out / "a.bin").write_bytes(payload)
        return {"n": len(payload)}

    return build


def leftovers(folder: Path) -> list[str]:
    """Temp or trash folders (hidden names) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def rewrite_entry(folder: Path, **changes) -> None:
    entry = json.loads((folder / ENTRY_FILE).read_text())
    entry.update(changes)
    (folder / ENTRY_FILE).write_text(json.dumps(entry))


@pytest.fixture
def no_exchange(monkeypatch):
    """Run without renameat2(RENAME_EXCHANGE): the rename-aside fallback."""
    monkeypatch.setattr(publish_mod, "_exchange_ok", False)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- basics ------------------------------------------------------------------------------------


def test_put_then_get_roundtrip(tmp_path):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k1", "model", write(b"abc"))
    again = cache.get("train", "k1")
    assert again is not None and again.digest == art.digest and again.info == {"n": 3}
    assert again.path == tmp_path / "train" / "k1" and again.kind == "model"
    entry = json.loads((again.path / ENTRY_FILE).read_text())
    assert (entry["stage"], entry["key"]) == ("train", "k1")
    assert entry["digest"] == stable_hash({"kind": "model", "files": {"a.bin": sha256_file(again.path / "a.bin")}})


def test_digest_depends_on_content_only(tmp_path):
    cache = StageCache(tmp_path)
    assert cache.put("s", "k1", "model", write(b"x")).digest == cache.put("s", "k2", "model", write(b"x")).digest
    assert cache.put("s", "k3", "model", write(b"y")).digest != cache.get("s", "k1").digest


def test_stable_hash_is_order_independent():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_names_that_escape_the_cache_are_refused(tmp_path):
    cache = StageCache(tmp_path)
    for stage, key in [("..", "k"), ("s", "../k"), ("s/t", "k"), ("s", ""), ("s", ".tmp-1-2-3")]:
        with pytest.raises(ValueError):
            cache.get(stage, key)
        with pytest.raises(ValueError):
            cache.put(stage, key, "model", write(b"x"))
    assert list(tmp_path.iterdir()) == []


# -- the cache does not trust itself -------------------------------------------------------------


def test_corrupt_entry_is_discarded(tmp_path):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    (art.path / "a.bin").write_bytes(b"abd")
    assert cache.get("train", "k") is None
    assert not art.path.exists()
    assert leftovers(tmp_path / "train") == []


def test_missing_entry_file_is_discarded(tmp_path):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    (art.path / ENTRY_FILE).unlink()
    assert cache.get("train", "k") is None
    assert not art.path.exists()


def test_entry_json_that_is_not_json_is_discarded(tmp_path):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    (art.path / ENTRY_FILE).write_text("{half")
    assert cache.get("train", "k") is None and not art.path.exists()


def test_entry_of_another_stage_moved_under_this_key_is_discarded(tmp_path):
    cache = StageCache(tmp_path)
    cache.put("train", "k", "model", write(b"train output"))
    prune = cache.put("prune", "k", "model", write(b"prune output"))
    shutil.rmtree(tmp_path / "train" / "k")
    prune.path.rename(tmp_path / "train" / "k")  # its files still match their recorded hashes
    assert cache.get("train", "k") is None
    assert not (tmp_path / "train" / "k").exists()


def test_entry_of_another_key_moved_under_this_key_is_discarded(tmp_path):
    cache = StageCache(tmp_path)
    cache.put("train", "k1", "model", write(b"one"))
    two = cache.put("train", "k2", "model", write(b"two"))
    shutil.rmtree(tmp_path / "train" / "k1")
    two.path.rename(tmp_path / "train" / "k1")
    assert cache.get("train", "k1") is None
    assert cache.get("train", "k2") is None  # moved away: a miss


def test_rehashed_file_without_a_new_digest_is_discarded(tmp_path):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    (art.path / "a.bin").write_bytes(b"evil")
    rewrite_entry(art.path, files={"a.bin": sha256_file(art.path / "a.bin")})
    assert cache.get("train", "k") is None and not art.path.exists()


def test_rewritten_kind_is_discarded(tmp_path):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    rewrite_entry(art.path, kind="bundle")
    assert cache.get("train", "k") is None


def test_unexpected_file_is_discarded(tmp_path):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    (art.path / "extra.bin").write_bytes(b"")
    assert cache.get("train", "k") is None and not art.path.exists()


def test_symlink_inside_an_entry_is_refused(tmp_path):
    cache = StageCache(tmp_path / "cache")
    art = cache.put("train", "k", "model", write(b"abc"))
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"abc")  # same content: the recorded hash would match through the link
    (art.path / "a.bin").unlink()
    (art.path / "a.bin").symlink_to(outside)
    assert cache.get("train", "k") is None
    assert not art.path.exists() and outside.read_bytes() == b"abc"


def test_symlinked_subfolder_is_refused(tmp_path):
    cache = StageCache(tmp_path / "cache")

    def build(out):
        (out / "sub").mkdir()
        (out / "sub" / "b.bin").write_bytes(b"b")
        return {}

    art = cache.put("train", "k", "model", build)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(art.path / "sub", elsewhere)
    shutil.rmtree(art.path / "sub")
    (art.path / "sub").symlink_to(elsewhere, target_is_directory=True)
    assert cache.get("train", "k") is None
    assert (elsewhere / "b.bin").read_bytes() == b"b"


def test_entry_folder_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path):
    real = StageCache(tmp_path / "real")
    art = real.put("train", "k", "model", write(b"abc"))
    (tmp_path / "cache" / "train").mkdir(parents=True)
    (tmp_path / "cache" / "train" / "k").symlink_to(art.path, target_is_directory=True)
    cache = StageCache(tmp_path / "cache")
    assert cache.get("train", "k") is None
    assert not os.path.lexists(tmp_path / "cache" / "train" / "k")
    assert real.get("train", "k") is not None  # the link was removed, never what it pointed to


def test_file_names_escaping_the_folder_are_refused(tmp_path):
    cache = StageCache(tmp_path / "cache")
    art = cache.put("train", "k", "model", write(b"abc"))
    (tmp_path / "cache" / "train" / "x.bin").write_bytes(b"x")
    files = {"a.bin": sha256_file(art.path / "a.bin"), "../x.bin": sha256_file(tmp_path / "cache" / "train" / "x.bin")}
    rewrite_entry(art.path, files=files, digest=stable_hash({"kind": "model", "files": files}))
    assert cache.get("train", "k") is None


def test_nested_entry_json_is_part_of_the_content(tmp_path):
    cache = StageCache(tmp_path)

    def build(out):
        (out / "sub").mkdir()
        (out / "sub" / ENTRY_FILE).write_text("{}")
        return {}

    art = cache.put("train", "k", "model", build)
    (art.path / "sub" / ENTRY_FILE).write_text('{"changed": 1}')
    assert cache.get("train", "k") is None


def test_build_output_with_a_symlink_is_rejected(tmp_path):
    cache = StageCache(tmp_path)

    def build(out):
        (out / "link").symlink_to("/etc/hostname")
        return {}

    with pytest.raises(ValueError, match="symlink"):
        cache.put("train", "k", "model", build)
    assert cache.get("train", "k") is None and leftovers(tmp_path / "train") == []


# -- races: put ----------------------------------------------------------------------------------


def test_failed_build_leaves_nothing(tmp_path):
    cache = StageCache(tmp_path)

    def boom(out):
        (out / "half.bin").write_bytes(b"half")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        cache.put("train", "k", "model", boom)
    assert cache.get("train", "k") is None
    assert list((tmp_path / "train").iterdir()) == []


def test_put_keeps_a_valid_entry_another_process_wrote_first(tmp_path):
    cache = StageCache(tmp_path)
    first = cache.put("train", "k", "model", write(b"first"))
    second = cache.put("train", "k", "model", write(b"second"))
    assert second.digest == first.digest and second.info == {"n": 5}
    assert (first.path / "a.bin").read_bytes() == b"first"
    assert leftovers(tmp_path / "train") == []


def test_put_during_a_concurrent_put_keeps_the_winner(tmp_path):
    """Two puts of the same key race: the one that renames second keeps the first one's entry."""
    cache = StageCache(tmp_path)

    def slow(out):
        (out / "a.bin").write_bytes(b"loser")
        winner = cache.put("train", "k", "model", write(b"winner"))  # lands while we build
        assert winner.path.exists()
        return {}

    got = cache.put("train", "k", "model", slow)
    assert (got.path / "a.bin").read_bytes() == b"winner" and got.info == {"n": 6}
    assert cache.get("train", "k").digest == got.digest
    assert leftovers(tmp_path / "train") == []


@pytest.mark.parametrize("exchange", [True, False])
def test_force_replaces_a_valid_entry(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(publish_mod, "_exchange_ok", False)
    cache = StageCache(tmp_path)
    cache.put("train", "k", "model", write(b"old"))
    new = cache.put("train", "k", "model", write(b"newer"), force=True)
    assert (new.path / "a.bin").read_bytes() == b"newer" and new.info == {"n": 5}
    assert cache.get("train", "k").digest == new.digest
    assert leftovers(tmp_path / "train") == []


@pytest.mark.parametrize("exchange", [True, False])
def test_put_replaces_an_invalid_entry(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(publish_mod, "_exchange_ok", False)
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    (art.path / "a.bin").write_bytes(b"rot")
    new = cache.put("train", "k", "model", write(b"abc"))
    assert new.digest == art.digest and cache.get("train", "k") is not None
    assert leftovers(tmp_path / "train") == []


def test_force_put_leaves_no_moment_without_an_entry(tmp_path):
    """With RENAME_EXCHANGE (Linux >= 3.15 on ext4, tmpfs, xfs, btrfs) a reader never finds the
    entry missing while it is being replaced."""
    cache = StageCache(tmp_path)
    cache.put("train", "k", "model", write(b"0"))
    final = tmp_path / "train" / "k"
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (final / ENTRY_FILE).exists():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(150):
            cache.put("train", "k", "model", write(str(i).encode()), force=True)
    finally:
        stop.set()
        watcher.join()
    assert publish_mod._exchange_ok, "renameat2(RENAME_EXCHANGE) is not usable here"
    assert missing == []
    assert (final / "a.bin").read_bytes() == b"149"


# -- races: get ----------------------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.EIO, errno.EACCES])
def test_transient_read_error_is_a_miss_not_a_deletion(tmp_path, monkeypatch, err):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))

    def failing(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(cache_mod, "_hash_open_file", failing)
    assert cache.get("train", "k") is None
    assert (art.path / "a.bin").read_bytes() == b"abc"
    monkeypatch.undo()
    assert cache.get("train", "k").digest == art.digest


def test_unreadable_entry_json_is_a_miss_not_a_deletion(tmp_path, monkeypatch):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    real_open = os.open

    def guarded(path, flags, *args, **kwargs):
        if path == ENTRY_FILE:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(cache_mod.os, "open", guarded)
    assert cache.get("train", "k") is None
    monkeypatch.undo()
    assert art.path.exists() and cache.get("train", "k") is not None


def test_entry_replaced_while_being_read_is_never_discarded(tmp_path, monkeypatch):
    """Another process force-puts the key while get hashes the old entry: the old entry's files
    vanish mid-read. That is a miss (or the new entry), never a deletion of the new one."""
    cache = StageCache(tmp_path)
    cache.put("train", "k", "model", write(b"old"))

    def build_new(out):
        (out / "a.bin").write_bytes(b"new")
        (out / "b.bin").write_bytes(b"more")
        return {"new": True}

    real = cache_mod._hash_open_file
    calls = []

    def racing(fd):
        if not calls:
            calls.append(1)
            StageCache(tmp_path).put("train", "k", "model", build_new, force=True)
        return real(fd)

    monkeypatch.setattr(cache_mod, "_hash_open_file", racing)
    got = cache.get("train", "k")
    monkeypatch.undo()
    assert got is None or got.info == {"new": True}
    again = cache.get("train", "k")
    assert again is not None and again.info == {"new": True}
    assert (again.path / "b.bin").read_bytes() == b"more"


def test_concurrent_discards_of_one_corrupt_entry(tmp_path, monkeypatch):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    (art.path / "a.bin").write_bytes(b"rot")
    real = cache_mod._table_fd
    calls = []

    def racing(fd, prefix=""):
        if not calls:
            calls.append(1)
            assert StageCache(tmp_path).get("train", "k") is None  # discards it under our feet
        return real(fd, prefix)

    monkeypatch.setattr(cache_mod, "_table_fd", racing)
    assert cache.get("train", "k") is None
    assert not art.path.exists() and leftovers(tmp_path / "train") == []


def test_discard_puts_back_an_entry_that_replaced_the_judged_one(tmp_path):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    cache._discard("train", "k", ident=(0, 0), reason="judged another folder")
    assert cache.get("train", "k").digest == art.digest
    assert leftovers(tmp_path / "train") == []


# -- temp folders of killed processes -------------------------------------------------------------

KILLED_PUT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edgec.pipeline.cache import StageCache

    def build(out):
        (out / "half.bin").write_bytes(b"half")
        print("building", flush=True)
        time.sleep(120)
        return {}

    StageCache(Path(sys.argv[1])).put("train", "k", "model", build)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_temp_folder_of_a_killed_put_is_collected(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PUT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "building"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = leftovers(tmp_path / "train")
    assert len(left) == 1 and left[0].startswith(f".tmp-{proc.pid}-")
    cache = StageCache(tmp_path)  # the next cache use collects it
    assert leftovers(tmp_path / "train") == []
    assert cache.get("train", "k") is None
    assert cache.put("train", "k", "model", write(b"x")).info == {"n": 1}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_collect_stale_keeps_live_processes_folders(tmp_path):
    stage = tmp_path / "train"
    stage.mkdir()
    mine = make_temp_dir(stage)  # this process: alive
    old = make_temp_dir(stage)
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    dead = stage / mine.name.replace(f"-{os.getpid()}-", f"-{dead_pid()}-", 1)
    dead.mkdir()
    (dead / "x").write_bytes(b"x")
    trash = stage / dead.name.replace(".tmp-", ".trash-", 1)
    trash.mkdir()
    other_host = stage / f".tmp-{dead_pid()}-00000000-{'0' * 12}"  # another machine's (shared cache): age only
    other_host.mkdir()
    unrelated = stage / ".keep-me"
    unrelated.mkdir()
    assert StageCache(tmp_path, collect=False).collect_stale() == 3  # old, dead, trash
    assert sorted(leftovers(stage)) == sorted([mine.name, other_host.name, ".keep-me"])


def test_stale_collection_on_construction(tmp_path):
    stage = tmp_path / "train"
    stage.mkdir()
    dead = stage / f".tmp-{dead_pid()}-{publish_mod._HOST}-{'a' * 12}"
    dead.mkdir()
    StageCache(tmp_path)
    assert leftovers(stage) == []


# -- modes -----------------------------------------------------------------------------------------


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_entries_get_umask_modes_not_mkdtemp_ones(tmp_path, umask022):
    cache = StageCache(tmp_path)

    def build(out):
        sub = Path(tempfile.mkdtemp(dir=out))  # 0o700
        fd = os.open(sub / "secret.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"s")
        os.close(fd)
        (out / "run.py").write_text("print()")
        os.chmod(out / "run.py", 0o700)
        (out / "a.bin").write_bytes(b"a")
        return {}

    art = cache.put("train", "k", "model", build)
    assert mode(art.path) == 0o755 and mode(tmp_path / "train") == 0o755
    sub = next(p for p in art.path.iterdir() if p.is_dir())
    assert mode(sub) == 0o755 and mode(sub / "secret.bin") == 0o644
    assert mode(art.path / "a.bin") == 0o644 and mode(art.path / ENTRY_FILE) == 0o644
    assert mode(art.path / "run.py") == 0o755
    assert cache.get("train", "k") is not None


def test_modes_follow_a_stricter_umask(tmp_path):
    old = os.umask(0o027)
    try:
        art = StageCache(tmp_path).put("train", "k", "model", write(b"a"))
    finally:
        os.umask(old)
    assert mode(art.path) == 0o750 and mode(art.path / "a.bin") == 0o640


# -- publish_directory ------------------------------------------------------------------------------


def fill_with(token: str, names=("a", "b", "sub/c")):
    def fill(tmp):
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(token)

    return fill


def read_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False])
def test_publish_creates_and_replaces(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(publish_mod, "_exchange_ok", False)
    final = tmp_path / "out" / "rpi"
    publish_directory(final, fill_with("one"))
    assert read_tree(final) == {"a": "one", "b": "one", "sub/c": "one"}
    publish_directory(final, fill_with("two", names=("a", "d")))
    assert read_tree(final) == {"a": "two", "d": "two"}
    assert leftovers(final.parent) == []


def test_publish_replaces_a_file_or_symlink(tmp_path):
    final = tmp_path / "rpi"
    final.write_text("not a folder")
    publish_directory(final, fill_with("x"))
    assert read_tree(final)["a"] == "x"
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("k")
    shutil.rmtree(final)
    final.symlink_to(target, target_is_directory=True)
    publish_directory(final, fill_with("y"))
    assert not final.is_symlink() and read_tree(final)["a"] == "y"
    assert (target / "keep").read_text() == "k"


def test_failing_fill_leaves_the_previous_result(tmp_path):
    final = tmp_path / "rpi"
    publish_directory(final, fill_with("good"))

    def boom(tmp):
        (tmp / "a").write_text("half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        publish_directory(final, boom)
    assert read_tree(final) == {"a": "good", "b": "good", "sub/c": "good"}
    assert leftovers(tmp_path) == []


def test_published_directory_gets_umask_modes(tmp_path, umask022):
    final = tmp_path / "rpi"

    def fill(tmp):
        sub = Path(tempfile.mkdtemp(dir=tmp))
        (sub / "f").write_text("f")
        os.chmod(sub / "f", 0o600)

    publish_directory(final, fill)
    sub = next(final.iterdir())
    assert mode(final) == 0o755 and mode(sub) == 0o755 and mode(sub / "f") == 0o644


@pytest.mark.parametrize("exchange", [True, False])
def test_concurrent_publishers_all_succeed(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(publish_mod, "_exchange_ok", False)
    final = tmp_path / "rpi"
    errors = []

    def publisher(i):
        try:
            for n in range(15):
                publish_directory(final, fill_with(f"{i}-{n}"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    tree = read_tree(final)
    assert set(tree) == {"a", "b", "sub/c"} and len(set(tree.values())) == 1
    assert leftovers(tmp_path) == []


def test_publish_collects_what_a_killed_publisher_left(tmp_path):
    stale = tmp_path / f".rpi.tmp-{dead_pid()}-{publish_mod._HOST}-{'b' * 12}"
    stale.mkdir()
    other = tmp_path / f".mobile.tmp-{dead_pid()}-{publish_mod._HOST}-{'c' * 12}"
    other.mkdir()
    publish_directory(tmp_path / "rpi", fill_with("x"))
    assert leftovers(tmp_path) == [other.name]  # only this final's leftovers are its business
    assert collect_stale(tmp_path) == 1 and leftovers(tmp_path) == []
