"""What machine this is, and the process's peak resident memory."""

import os
import platform
import sys

import numpy as np


def _read_first(path, prefix=None):
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16).decode("utf-8", "replace")
    except OSError:
        return None
    if prefix is None:
        return data.replace("\x00", "").strip() or None
    for line in data.splitlines():
        if line.lower().startswith(prefix.lower()):
            return line.split(":", 1)[1].strip() or None
    return None


def usable_cpu_count():
    """CPUs this process may run on (affinity-aware), at most ``os.cpu_count()``."""
    n = os.cpu_count() or 1
    try:
        return max(1, min(n, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return n


# The instruction sets that pick different int8 / fp32 kernels (oneDNN, XNNPACK, MLAS), so results that
# differ in the last bits or in an int8 rounding can be traced to the CPU that produced them.
KERNEL_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
                    "amx_bf16", "asimd", "asimddp", "i8mm", "sve")


def cpu_features():
    """The ``KERNEL_ISA_FLAGS`` this CPU lists in /proc/cpuinfo (x86 ``flags``, arm ``Features``); None
    where there is no /proc/cpuinfo."""
    flags = _read_first("/proc/cpuinfo", "flags") or _read_first("/proc/cpuinfo", "Features")
    if flags is None:
        return None
    present = set(flags.split())
    return [flag for flag in KERNEL_ISA_FLAGS if flag in present]


def machine_info():
    """``{"machine", "system", "platform", "python", "numpy", "cpu_count", "usable_cpus", "cpu", "cpu_features",
    "device_model"}``.

    ``machine`` is ``platform.machine()`` (x86_64, aarch64, armv7l, arm64, AMD64 ...);
    ``cpu_features`` which of ``KERNEL_ISA_FLAGS`` the CPU has (AMX, AVX-512, NEON dot product ...);
    ``device_model`` is /proc/device-tree/model where present (e.g. "Raspberry Pi 4 Model B Rev 1.4").
    """
    cpu = _read_first("/proc/cpuinfo", "model name") or _read_first("/proc/cpuinfo", "Model") \
        or platform.processor() or None
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpu_count(),
        "cpu": cpu,
        "cpu_features": cpu_features(),
        "device_model": _read_first("/proc/device-tree/model"),
    }


def peak_rss_bytes():
    """Peak resident set size of this process in bytes (``resource.getrusage(RUSAGE_SELF).ru_maxrss``;
    kilobytes on Linux, bytes on macOS). None where ``resource`` does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(v) if sys.platform == "darwin" else int(v) * 1024
