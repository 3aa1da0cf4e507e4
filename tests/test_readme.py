"""The README's runnable code blocks, run as a new user would run them, each in a fresh folder.

Run: every ```python block, and the shell blocks of "Quick start" and "On the device". A block
preceded by an ``<!-- not-run: why -->`` line is illustrative and skipped. Two adaptations, both
checked rather than ignored: the quick start's install commands are compared with this environment
(the torch pin, the constraints file) instead of reinstalling it, and on the device ``pip install -r
requirements.txt`` is replaced by linking this environment into the venv the README creates, after
the same runtime (ai-edge-litert for the Pi's tflite-runtime).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = "<!-- not-run"
BIN = Path(sys.executable).parent  # this environment's console scripts (edgec)


@dataclass
class Block:
    section: str  # the nearest "## " heading
    lang: str
    code: str
    line: int
    run: bool


def readme_blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    blocks, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            run = not (i > 0 and lines[i - 1].startswith(NOT_RUN))
            blocks.append(Block(section, line[3:].strip(), "\n".join(lines[i + 1:end]), i + 1, run))
            i = end
        i += 1
    return blocks


def section_blocks(section: str) -> list[Block]:
    found = [b for b in readme_blocks() if b.section == section and b.lang == "" and b.run]
    assert found, f"README has no runnable block under '## {section}'"
    return found


def commands(block: Block) -> list[str]:
    """The block's commands: comments dropped, ``a && b`` split."""
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in block.code.splitlines())
    return [c.strip() for line in lines if line for c in line.split("&&")]


def shell(command: str, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"README command `{command}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def user_env(home: Path, cache: Path) -> dict:
    """A shell as a user's: this environment's scripts first on PATH, its own home and stage cache."""
    return {**os.environ, "HOME": str(home), "EDGEC_CACHE_DIR": str(cache), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


# ---- the blocks the test finds ---------------------------------------------------------------------------


def test_readme_blocks_are_found_and_every_skipped_one_says_why():
    blocks = readme_blocks()
    assert any(b.lang == "python" and b.run for b in blocks)
    text = README.read_text()
    assert all(re.fullmatch(r"<!-- not-run: \S.* -->", m) for m in re.findall(r"<!-- not-run.*", text))


@pytest.mark.parametrize("block", [b for b in readme_blocks() if b.lang == "python" and b.run],
                         ids=lambda b: f"line{b.line}")
def test_python_block_runs(tmp_path, block):
    proc = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, capture_output=True, text=True,
                          env=user_env(tmp_path, tmp_path / "user-cache"), timeout=900)
    assert proc.returncode == 0, f"README.md:{block.line} failed:\n{proc.stderr[-3000:]}"


# ---- quick start, then the bundle on the device ------------------------------------------------------------


def check_install(command: str) -> None:
    """An install step of the quick start, checked against this environment instead of run."""
    words = shlex.split(command)
    if words[1:3] == ["-m", "venv"]:
        return
    assert words[0].endswith("/pip") and words[1] == "install", f"unexpected quick-start command {command!r}"
    pins = [w for w in words if w.startswith("torch==")]
    if pins:
        assert pins == [f"torch=={torch.__version__.split('+')[0]}"]
        assert pins[0] in (ROOT / "constraints.txt").read_text().split()
    else:
        assert words[2:4] == ["-c", "constraints.txt"], f"edgec is installed without its constraints: {command!r}"


@pytest.fixture(scope="module")
def quick_start_bundle(tmp_path_factory) -> Path:
    """The quick start in a fresh folder: its install steps checked, its build run."""
    work, cache = tmp_path_factory.mktemp("quick-start"), tmp_path_factory.mktemp("quick-start-cache")
    (block,) = [b for b in section_blocks("Quick start") if "edgec build" in b.code]
    steps = commands(block)
    for step in steps[:-1]:
        check_install(step)
    assert steps[-1].startswith(".venv/bin/edgec build"), steps[-1]
    shell(steps[-1].removeprefix(".venv/bin/"), work, user_env(work, cache))
    bundle = work / "edgec-out" / "rpi" / "bundle"
    assert (bundle / "manifest.json").is_file()
    return bundle


def link_environment(venv: Path, requirements: Path) -> None:
    """Stand-in for ``pip install -r requirements.txt`` (no network in tests): the venv sees this
    environment's packages. The rpi bundle asks for the Pi's runtime (tflite-runtime, no x86 wheel);
    the runner uses ai-edge-litert, its x86 equivalent, here."""
    assert any(line.strip() for line in requirements.read_text().splitlines())
    (site_dir,) = venv.glob("lib/python3*/site-packages")
    (site_dir / "edgec-test-env.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")


@pytest.mark.slow
def test_quick_start_then_on_the_device(tmp_path, quick_start_bundle):
    """The bundle copied to a "device" folder; the README's device steps run there, in its order."""
    home = tmp_path / "home"
    home.mkdir()
    bundle = shutil.copytree(quick_start_bundle, tmp_path / "device" / "bundle")
    env = user_env(home, tmp_path / "cache")
    ran = []
    for block in section_blocks("On the device"):
        for step in commands(block):
            words = shlex.split(step)
            if words[0] == "python3" and words[1:3] == ["-m", "venv"]:
                venv = Path(words[3].replace("~", str(home), 1))
                subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
                assert not venv.resolve().is_relative_to(bundle.resolve()), "the README puts the venv inside the bundle"
            elif words[1:] == ["install", "-r", "requirements.txt"]:
                link_environment(venv, bundle / "requirements.txt")
            else:
                ran.append(shell(step, bundle, env, timeout=600).stdout)
    assert any("run.py verify" in step for b in section_blocks("On the device") for step in commands(b))
    assert ran and "OK" in ran[0], ran[:1]
