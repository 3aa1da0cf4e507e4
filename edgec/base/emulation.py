"""Prove an arm64 (Raspberry Pi) bundle on this machine: run it on an emulated aarch64 userland.

The userland is Debian bookworm's arm64 ``python3.11`` (what Raspberry Pi OS bookworm ships),
unpacked with ``dpkg -x`` from the .debs that apt downloads with private state (the host's apt
lists and dpkg database are never touched). The device packages are a runtime's list in
``targets/`` (``rpi-device-requirements*.txt``), installed by pip for the aarch64 platform: the same
list ``Dockerfile.arm64`` and a Pi install. ``qemu-aarch64-static`` (qemu-user) runs the interpreter
as a Raspberry Pi 4 CPU (Cortex-A72), and the userland carries a Pi 4's ``/proc/cpuinfo``.

Both parts are cached under ``cache_dir``: each is built in a temporary folder there and renamed
into place only when complete and checked, so a half-built cache is never used.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgec.base.errors import ConfigError, InputError, RunError

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgec" / "arm64"

# runtime (pip distribution) -> (requirements file in edgec.targets, module the runtime is imported as)
RUNTIMES = {
    "ai-edge-litert": ("rpi-device-requirements.txt", "ai_edge_litert.interpreter"),
    "tflite-runtime": ("rpi-device-requirements-tflite-runtime.txt", "tflite_runtime.interpreter"),
}
DEFAULT_RUNTIME = "ai-edge-litert"  # the rpi target's default device install (rpi-device-requirements.txt)

# The Raspberry Pi 4's core. qemu's default CPU ("max", with SVE/SME) made XNNPACK's int8 kernels
# in ai-edge-litert compute wrong outputs; a Pi never runs those code paths.
QEMU_CPU = "cortex-a72"
# qemu-user passes the host's (x86) /proc/cpuinfo through; the cpuinfo library inside ai-edge-litert
# and onnxruntime then dereferences NULL and segfaults. qemu opens absolute paths under its -L prefix
# first, so the userland carries what a Raspberry Pi 4 (Raspberry Pi OS, 64-bit) shows instead.
PI4_CPUINFO = "".join(
    f"processor\t: {cpu}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
    for cpu in range(4)
) + "Revision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"

DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEBIAN_SOURCES = "".join(
    f"deb [arch=arm64 signed-by={DEBIAN_KEYRING}] http://deb.debian.org/{path} {suite} main\n"
    for path, suite in [("debian", "bookworm"), ("debian", "bookworm-updates"),
                        ("debian-security", "bookworm-security")]
)
# The userland: Raspberry Pi OS's interpreter plus the C++ runtime every runtime wheel links against.
USERLAND_DEBS = ["python3.11", "libstdc++6"]
# Dependencies of those that an interpreter never needs (maintainer-script machinery).
SKIPPED_DEBS = {"debconf", "dpkg", "perl", "perl-base", "tzdata", "media-types"}
# Packages a check may need besides the runtime's list: name -> (requirement, module that must import).
# cryptography checks a signed bundle's manifest.sig (`run.py verify --public-key`); its aarch64
# wheels (abi3, manylinux) come from PyPI like the runtimes'.
EXTRA_PACKAGES = {
    "cryptography": ("cryptography>=42", "cryptography.hazmat.primitives.asymmetric.ed25519"),
}
# Bookworm has glibc 2.36; pip takes platform tags literally, so list every one a Pi accepts.
PIP_PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)]

USERLAND = "bookworm-" + hashlib.sha256(f"{DEBIAN_SOURCES}{USERLAND_DEBS}{PI4_CPUINFO}".encode()).hexdigest()[:12]
PYTHON = "usr/bin/python3.11"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Arm64Python:
    """Debian bookworm's aarch64 python3.11 with the device packages, run under qemu-user as a Pi 4 CPU."""

    qemu: str
    root: Path  # the unpacked userland (qemu's -L prefix)
    site: Path  # the device packages, on PYTHONPATH
    info: dict  # what the interpreter reported when the cache was built: machine, python, runtime, versions

    def run(self, args: list[str], cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``python3.11 *args`` on the emulated aarch64 userland; output is captured as text."""
        base_env = {
            "PATH": "/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/"),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(self.site),
            "PYTHONNOUSERSITE": "1",
            # Bytecode goes to the cache, never next to the sources (a bundle is left untouched).
            "PYTHONPYCACHEPREFIX": str(self.site.parent / "pycache"),
        }
        return subprocess.run(
            [self.qemu, "-cpu", QEMU_CPU, "-L", str(self.root), str(self.root / PYTHON), *map(str, args)],
            cwd=cwd, env={**base_env, **(env or {})}, capture_output=True, text=True,
        )


def prepare_arm64_python(cache_dir: Path, runtime: str = DEFAULT_RUNTIME,
                         progress: Progress | None = None, extras: tuple[str, ...] = ()) -> Arm64Python:
    """The emulated aarch64 Python with ``runtime``'s device packages (plus ``extras``, names from
    EXTRA_PACKAGES), built once under ``cache_dir``."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"no emulated check for runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    unknown = [name for name in extras if name not in EXTRA_PACKAGES]
    if unknown:
        raise ConfigError(f"no emulated package {unknown[0]!r}: choose from {', '.join(EXTRA_PACKAGES)}")
    extras = tuple(sorted(set(extras)))
    say = progress or (lambda message: None)
    qemu = _tool("qemu-aarch64-static", "install it with `apt-get install qemu-user-static`")
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)

    root = cache_dir / USERLAND
    if not root.is_dir():
        _build(root, lambda tmp: _unpack_userland(tmp, say))

    requirements_file, module = RUNTIMES[runtime]
    requirements = importlib.resources.files("edgec.targets").joinpath(requirements_file).read_text()
    if extras:
        requirements = requirements.rstrip("\n") + "\n" + "".join(EXTRA_PACKAGES[name][0] + "\n" for name in extras)
    key = hashlib.sha256((requirements + " ".join(PIP_PLATFORMS)).encode()).hexdigest()[:12]
    packages = cache_dir / f"{runtime}-{key}"
    extra_modules = [EXTRA_PACKAGES[name][1] for name in extras]
    if not packages.is_dir():
        _build(packages, lambda tmp: _install_packages(tmp, qemu, root, requirements, runtime, module, say,
                                                       extra_modules))
    info = json.loads((packages / "info.json").read_text())
    return Arm64Python(qemu, root, packages / "site", info)


# Times TFLite models on the emulated core in one process: argv = interpreter module (from RUNTIMES),
# threads, warm-up runs, rounds, timed runs per round, model paths. Each round times every model
# (order alternating between rounds) and keeps its p50; the first round is dropped (its first model
# measured 2.5-3x, even after warm-up runs); prints the rounds x models p50s in ms as JSON.
_TIME_MODELS = """
import importlib, json, sys, time
import numpy as np
module, threads, warmup, rounds, runs = sys.argv[1], *map(int, sys.argv[2:6])
interpreters = []
for path in sys.argv[6:]:
    it = importlib.import_module(module).Interpreter(model_path=path, num_threads=threads)
    it.allocate_tensors()
    for d in it.get_input_details():
        it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    for _ in range(warmup):
        it.invoke()
    interpreters.append(it)
table = []
for r in range(rounds + 1):
    row = [0.0] * len(interpreters)
    order = range(len(interpreters)) if r % 2 == 0 else reversed(range(len(interpreters)))
    for i in order:
        times = []
        for _ in range(runs):
            t = time.perf_counter_ns()
            interpreters[i].invoke()
            times.append(time.perf_counter_ns() - t)
        row[i] = float(np.median(times)) / 1e6
    table.append(row)
print(json.dumps({"p50_ms": table[1:]}))
"""


def emulated_round_p50s_ms(python: Arm64Python, model_paths: list[Path], threads: int = 1, warmup: int = 3,
                           rounds: int = 5, runs: int = 3) -> list[list[float]]:
    """p50s in ms (``[round][model]``) of TFLite models (batch 1, zero input) timed on the emulated Pi 4
    core in ONE process, in alternating rounds: on a busy host qemu's speed drifts by 2x between
    processes, so only figures of the same round compare. Relative figures only: qemu translates every
    instruction, so the ratio of two models is what carries over."""
    module = RUNTIMES[python.info["runtime"]][1]
    done = python.run(["-c", _TIME_MODELS, module, *(str(int(v)) for v in (threads, warmup, rounds, runs)),
                       *(str(Path(p).resolve()) for p in model_paths)])
    if done.returncode != 0:
        raise RunError(f"timing {len(model_paths)} model(s) on the emulated arm64 core failed: {_reason(done)}")
    return json.loads(done.stdout.strip().splitlines()[-1])["p50_ms"]


def emulated_identity(python: Arm64Python) -> dict:
    """What decides an emulated timing: the emulated core, qemu, the runtime and the host running qemu."""
    from edgec.ondevice.machine import machine_info

    qemu = subprocess.run([python.qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return {"cpu": f"emulated {QEMU_CPU} ({qemu[0] if qemu else 'qemu-aarch64'})", "machine": "aarch64",
            "emulator_host_cpu": machine_info()["cpu"], "python": python.info.get("python")}


def verify_bundle_emulated(bundle_dir: Path, cache_dir: Path, runtime: str = DEFAULT_RUNTIME,
                           progress: Progress | None = None, exact: bool = True,
                           public_key: Path | None = None) -> dict:
    """Run the bundle's ``run.py verify [--exact] [--public-key KEY]`` on the emulated aarch64 Python;
    the bundle is not copied. With ``public_key`` the userland also gets ``cryptography`` (its aarch64
    wheel), and run.py checks the bundle's signature there first.

    ``exact`` demands outputs bit-identical to the build machine's; use it for the runtime that made
    the bundle's expected outputs (ai-edge-litert). Another runtime's kernels may round int8 outputs
    differently, so it is checked within the manifest's tolerance for that runtime (run.py picks it
    by the runtime it loaded: ``tolerance.runtimes``).

    Returns the verify report plus ``emulation``: machine, cpu, python, runtime and versions, the
    exit code of ``run.py`` (0 passed, 1 mismatch) and the runtimes this run did not check, with why.
    Raises InputError when run.py reports a bad bundle (exit 2) and RunError when it writes no report.
    """
    bundle_dir = Path(bundle_dir).resolve()
    if not (bundle_dir / "run.py").is_file():
        raise InputError(f"{bundle_dir} is not a bundle (no run.py): build one with `edgec build`")
    key_args: list = []
    if public_key is not None:
        key_path = Path(public_key).expanduser().resolve()
        if not key_path.is_file():
            raise InputError(f"public key {key_path} not found: pass the edgec.pub written by `edgec keys generate`")
        key_args = ["--public-key", key_path]
    python = prepare_arm64_python(cache_dir, runtime, progress, extras=("cryptography",) if key_args else ())
    if progress:
        progress(f"running run.py verify on emulated aarch64 ({runtime})")
    with tempfile.TemporaryDirectory(prefix="edgec-verify-") as tmp:
        report_file = Path(tmp) / "verify.json"
        done = python.run(["run.py", "verify", *(["--exact"] if exact else []), *key_args, "--json", report_file],
                          cwd=bundle_dir)
        if done.returncode == 2:
            raise InputError(f"emulated verify of {bundle_dir} says the bundle is unusable: {_reason(done)}")
        if not report_file.is_file():
            raise RunError(f"emulated verify of {bundle_dir} exited {done.returncode} without a report: "
                           f"{_reason(done)}")
        report = json.loads(report_file.read_text())
    not_checked = {name: f"not requested: verify again with runtime={name!r}"
                   for name in RUNTIMES if name != runtime}
    return {**report, "emulation": {**python.info, "cpu": QEMU_CPU, "exit_code": done.returncode, "exact": exact,
                                    "not_checked": not_checked}}


def _unpack_userland(root: Path, say: Progress) -> None:
    """dpkg -x USERLAND_DEBS and their arm64 dependencies (private apt state) into root; add a Pi's cpuinfo."""
    apt_get = _tool("apt-get", "the emulated check needs Debian/Ubuntu's apt-get")
    apt_cache = _tool("apt-cache", "the emulated check needs Debian/Ubuntu's apt-cache")
    dpkg = _tool("dpkg", "the emulated check needs dpkg (`apt-get install dpkg`)")
    if not Path(DEBIAN_KEYRING).is_file():
        raise InputError(f"{DEBIAN_KEYRING} is missing: install it with `apt-get install debian-archive-keyring`")
    with tempfile.TemporaryDirectory(prefix=".apt-", dir=root.parent) as tmp:
        state = Path(tmp)
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d", "debs"]:
            (state / sub).mkdir(parents=True)
        (state / "status").touch()
        (state / "sources.list").write_text(DEBIAN_SOURCES)
        apt = [
            "-oAPT::Architecture=arm64", "-oAPT::Architectures=arm64",
            f"-oDir::State::Lists={state / 'lists'}", f"-oDir::State::status={state / 'status'}",
            f"-oDir::Cache={state / 'cache'}", f"-oDir::Etc::SourceList={state / 'sources.list'}",
            f"-oDir::Etc::SourceParts={state / 'sources.list.d'}",
            f"-oDir::Etc::PreferencesParts={state / 'preferences.d'}",
            "-oAPT::Sandbox::User=root",  # apt's _apt user cannot reach a cache under the user's home
        ]
        network_fix = "check that deb.debian.org is reachable (or apt's proxy settings)"
        say("apt: reading Debian bookworm arm64 package lists")
        _call([apt_get, *apt, "-q", "--error-on=any", "update"], "apt-get update (Debian bookworm arm64)",
              network_fix)
        tree = _call([apt_cache, *apt, "depends", "--recurse", "--no-recommends", "--no-suggests",
                      "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *USERLAND_DEBS],
                     f"apt-cache depends {' '.join(USERLAND_DEBS)} (arm64)", network_fix)
        names = sorted({line for line in tree.splitlines() if line[:1].isalnum()} - SKIPPED_DEBS)
        say(f"apt: downloading {len(names)} arm64 .debs ({', '.join(USERLAND_DEBS)} and their dependencies)")
        debs = state / "debs"
        _call([apt_get, *apt, "-q", "download", *names], "apt-get download (arm64 .debs)", network_fix, cwd=debs)
        say("dpkg: unpacking the arm64 userland")
        for deb in sorted(debs.glob("*.deb")):
            _call([dpkg, "-x", str(deb), str(root)], f"dpkg -x {deb.name}", "the download may be corrupt: retry")
    if not (root / PYTHON).is_file():
        raise InputError(f"the arm64 .debs did not contain {PYTHON}: is the Debian bookworm archive reachable?")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").write_text(PI4_CPUINFO)


def _install_packages(packages: Path, qemu: str, root: Path, requirements: str, runtime: str, module: str,
                      say: Progress, extra_modules: list[str] | None = None) -> None:
    """pip-install the device packages for cp311 aarch64 into packages/site; check they import there."""
    (packages / "requirements.txt").write_text(requirements)
    say(f"pip: downloading {runtime} and its dependencies for cp311 manylinux aarch64")
    platforms = [option for tag in PIP_PLATFORMS for option in ("--platform", tag)]
    _call([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
           "--target", str(packages / "site"), "--only-binary=:all:", "--implementation", "cp",
           "--python-version", "3.11", *platforms, "-r", str(packages / "requirements.txt")],
          f"pip install of {runtime} for aarch64", "check that PyPI is reachable and pip is installed")
    say(f"checking that {runtime} imports on the emulated aarch64 Python")
    probe = Arm64Python(qemu, root, packages / "site", {})
    done = probe.run(["-c", _PROBE, module, runtime, *(extra_modules or [])])
    if done.returncode != 0:
        raise InputError(f"{runtime} does not import on the emulated aarch64 Python: {_reason(done)}")
    info = json.loads(done.stdout)
    if info["machine"] != "aarch64":
        raise InputError(f"the emulated Python reports machine {info['machine']!r}, not aarch64")
    (packages / "info.json").write_text(json.dumps(info, indent=1) + "\n")


_PROBE = """
import importlib, importlib.metadata as md, json, platform, sys
module, runtime, extras = sys.argv[1], sys.argv[2], sys.argv[3:]
importlib.import_module(module)
for extra in extras:
    importlib.import_module(extra)
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "runtime": runtime,
                  "runtime_version": md.version(runtime), "numpy_version": md.version("numpy"),
                  "extras": {e.split(".")[0]: md.version(e.split(".")[0]) for e in extras}}))
"""


def _build(final: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary folder next to ``final`` and rename it to ``final``; nothing is left on failure."""
    tmp = Path(tempfile.mkdtemp(prefix=f".partial-{final.name}-", dir=final.parent))
    try:
        fill(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # else another process finished the same build first: use its copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tool(name: str, fix: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise InputError(f"{name} not found on PATH: {fix}")
    return path


def _call(cmd: list[str], what: str, fix: str, cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"{what} failed ({_reason(done)}): {fix}")
    return done.stdout


def _reason(done: subprocess.CompletedProcess[str]) -> str:
    """The line that says why a command failed: apt's or pip's first error, else the last (a traceback's)."""
    lines = (done.stderr or done.stdout).strip().splitlines()
    flagged = [line for line in lines if line.startswith(("E:", "W:", "ERROR:"))]
    return flagged[0] if flagged else lines[-1] if lines else f"exit code {done.returncode}"
