"""Pin torch's CPU kernels before torch loads: one seed, one result, at any thread count.

On AVX-512 hosts torch's own kernels (ATen) and MKL's GEMMs take code paths whose float sums
depend on the thread count (embeddings at 1 and 2 threads differed in the fourth decimal on a
Xeon with AVX-512); their AVX2 paths, with MKL in strict reproducible mode, do not. Setting the
variables after torch loaded changes nothing, so ``import cicl`` does it first, and Ray workers
get the same variables (``distributed.ray_runtime_env``). A value the user set is kept.
"""

from __future__ import annotations

import os
import platform

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kernel_env() -> dict[str, str]:
    """The variables that pin the kernels on this host: the AVX2 path on x86 CPUs that have
    AVX2 (asking for it on a CPU without AVX2 would crash), nothing elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64") or "avx2" not in _cpu_flags():
        return {}
    return {k: os.environ.get(k, v) for k, v in PINNED.items()}


def pin_cpu_kernels() -> None:
    for key, value in kernel_env().items():
        os.environ.setdefault(key, value)
