"""The Raspberry Pi image (Dockerfile.arm64) built here under qemu and the quick-start bundle run in it.

Out of the default run (10+ minutes, root, podman, network to deb.debian.org and PyPI): set
EDGEC_ARM64_IMAGE=1 to run it.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_image_build = pytest.mark.skipif(
    os.environ.get("EDGEC_ARM64_IMAGE") != "1" or os.geteuid() != 0 or shutil.which("podman") is None
    or shutil.which("qemu-aarch64-static") is None,
    reason="the arm64 image build is opt-in: EDGEC_ARM64_IMAGE=1, as root, with podman and qemu-user-static")


@needs_image_build
def test_image_builds_and_the_bundle_verifies_and_benches_in_it():
    done = subprocess.run(["bash", "scripts/arm64-image.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "TAG": "edgec-rpi-test"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "image edgec-rpi-test:" in done.stdout and "linux/arm64" in done.stdout
    assert "edgec verify: OK" in done.stdout
    assert "machine  aarch64" in done.stdout and "p50" in done.stdout


@pytest.mark.parametrize("bundle", ["/tmp/elsewhere", "../elsewhere", "edgec-out/../../x"])
def test_script_refuses_a_bundle_outside_the_build_context_before_any_work(bundle):
    done = subprocess.run(["bash", "scripts/arm64-image.sh", bundle], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "inside the repository" in done.stderr and "==>" not in done.stdout


def test_script_refuses_an_unknown_requirements_file_before_any_work():
    done = subprocess.run(["bash", "scripts/arm64-image.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "REQUIREMENTS": "targets/nope.txt"})
    assert done.returncode == 2 and "no requirements file" in done.stderr
