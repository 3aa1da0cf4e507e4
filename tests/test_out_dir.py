"""Where a build publishes: it never replaces a folder that is not an edgec build, never overlaps
the stage cache, never puts the cache under / or the current folder, and a full disk is one line
with the previous build kept (issue 22 items 4, 7, 14, 15)."""

import json
import os
import shutil
import subprocess

import pytest

from support import run_cli

from edgec.config import default_cache_dir
from edgec.base.errors import ConfigError

TINY = ["--target", "desktop-gpu", "--model", "mlp", "--stages", "train,export", "--epochs", "1"]


def _one_line_error(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny build published into an out folder whose target folder existed, empty."""
    base = tmp_path_factory.mktemp("outdir")
    (base / "out" / "desktop-gpu").mkdir(parents=True)
    run_cli("build", *TINY, "--cache-dir", base / "cache", "--out", base / "out", cwd=base)
    return base


# -- out-dir ownership -------------------------------------------------------------------------


def test_empty_target_folder_is_used_and_an_edgec_build_is_replaced(built):
    final = built / "out" / "desktop-gpu"
    assert (final / "build.json").is_file() and (final / "bundle" / "manifest.json").is_file()
    before = json.loads((final / "build.json").read_text())
    run_cli("build", *TINY, "--cache-dir", built / "cache", "--out", built / "out", cwd=built)
    assert json.loads((final / "build.json").read_text())["config"] == before["config"]


@pytest.mark.parametrize("layout", ["user-files", "build-json-only", "a-file", "a-symlink"])
def test_a_target_folder_that_is_not_an_edgec_build_is_refused(tmp_path, layout):
    final = tmp_path / "out" / "desktop-gpu"
    final.parent.mkdir()
    if layout == "user-files":
        final.mkdir()
        (final / "thesis.tex").write_text("years of work")
    elif layout == "build-json-only":
        final.mkdir()
        (final / "build.json").write_text("{}")
        (final / "notes.txt").write_text("mine")
    elif layout == "a-file":
        final.write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        final.symlink_to(tmp_path / "elsewhere")
    snapshot = sorted(p.name for p in final.iterdir()) if final.is_dir() and not final.is_symlink() else None
    proc = run_cli("build", *TINY, "--out", tmp_path / "out", cwd=tmp_path, check=2)
    _one_line_error(proc, str(final), "not an edgec build", "--out")
    assert os.path.lexists(final)
    if snapshot is not None:
        assert sorted(p.name for p in final.iterdir()) == snapshot


# -- cache and out must not overlap ------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "cache-in-out", "cache-in-target", "out-in-cache"])
def test_cache_and_out_overlapping_is_refused_before_any_work(tmp_path, where):
    out, cache = {"same": ("out", "out"), "cache-in-out": ("out", "out/cache"),
                  "cache-in-target": ("out", "out/desktop-gpu/cache"), "out-in-cache": ("cache/out", "cache")}[where]
    out, cache = tmp_path / out, tmp_path / cache
    proc = run_cli("build", *TINY, "--out", out, "--cache-dir", cache, cwd=tmp_path, check=2)
    _one_line_error(proc, "overlap", "--cache-dir")
    assert not out.exists() and not (cache.exists() and any(cache.iterdir()))


# -- where the default cache lives -------------------------------------------------------------


@pytest.mark.parametrize("home", ["", "relative/home", "/"])
def test_no_usable_home_is_one_line_asking_for_a_cache_dir(tmp_path, home):
    env = {"HOME": home, "EDGEC_CACHE_DIR": "", "XDG_CACHE_HOME": "", "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    proc = run_cli("build", *TINY, "--out", tmp_path / "out", cwd=tmp_path, env=env, check=2)
    _one_line_error(proc, "EDGEC_CACHE_DIR", "--cache-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no cfg, no .cache, no out, nothing under cwd


def test_relative_xdg_cache_home_is_ignored(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEC_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    assert default_cache_dir() == tmp_path / ".cache" / "edgec"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "edgec"
    monkeypatch.setenv("HOME", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    with pytest.raises(ConfigError, match="EDGEC_CACHE_DIR"):
        default_cache_dir()


# -- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (room for one tiny build, not for a second beside it); skipped where mounting
    is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_during_publish_is_one_line_and_keeps_the_previous_build(built, small_disk):
    out = small_disk / "out"
    shutil.copytree(built / "out" / "desktop-gpu", out / "desktop-gpu")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    proc = run_cli("build", *TINY, "--cache-dir", built / "cache", "--out", out, cwd=built, check=1)
    _one_line_error(proc, "no space left on device", str(out / "desktop-gpu"))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # nothing half-written
