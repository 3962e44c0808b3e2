"""What CPU this is: model, cores, NUMA nodes and the instruction-set flags that decide speed.

Read from /proc and /sys (Linux); used by the worker to record the machine a trial really ran on.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

# Flags that change which kernels run fast for training (bf16/int8 matmul units, vector width).
FLAGS_OF_INTEREST = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx512bw",
                     "avx512vl", "avx512dq", "avx2", "fma")


def _cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo as a dict (empty where /proc is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def format_cores(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the notation cpu.cores and taskset accept)."""
    runs: list[list[int]] = []
    for c in sorted(cores):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def numa_nodes() -> int:
    nodes = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    return max(1, len(nodes))


def usable_cores() -> int:
    """Cores this process may run on (respects taskset / cgroup cpusets), not the machine's total."""
    return len(os.sched_getaffinity(0))


def memory_mb(meminfo: Path = Path("/proc/meminfo")) -> float:
    """The machine's physical memory (MemTotal), in MiB."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"{meminfo}: no MemTotal line")


def gemm_peak(threads: int, n: int = 2048, reps: int = 10) -> dict[str, float | int]:
    """The fp32 matmul peak, measured: the best of ``reps`` square products of size ``n`` after two
    warm-ups (page-in, MKL's kernel choice); the median says how steady it was. Sets torch's threads:
    run it in a process of its own where that matters (bench.gemm)."""
    import statistics
    import time

    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.mm(a, b, out=out)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"gflops_peak": max(rates), "gflops_median": statistics.median(rates), "n": n, "reps": reps,
            "threads": torch.get_num_threads()}


def probe() -> dict[str, object]:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "model": info.get("model name", platform.processor() or "unknown"),
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "numa_nodes": numa_nodes(),
        "flags": {f: f in flags for f in FLAGS_OF_INTEREST},
        "machine": platform.machine(),
    }


def suggest(facts: dict[str, object], allocators: dict[str, str | None]) -> dict[str, object]:
    """A cpu profile to start from on this machine; measure it against cpu=default before trusting it."""
    flags = facts["flags"]
    assert isinstance(flags, dict)
    profile: dict[str, object] = {
        "threads": facts["usable_cores"], "interop_threads": 1,
        # measured here: tcmalloc 1.16x tokens/s and 25% less RSS than glibc; jemalloc 1.09x
        "allocator": next((a for a in ("tcmalloc", "jemalloc") if allocators.get(a)), "system"),
        # native bf16 units make bf16 autocast pay; without them it is emulated and slower
        "dtype": "bf16" if flags.get("amx_bf16") else "fp32",
        "omp_proc_bind": None,  # pinning slowed a shared VM; try `close` on a dedicated machine
    }
    return profile


# ---- allocators: which are installed here, which this process runs with ------------------------
# Debian's packages for each allocator (what `make setup` installs) and the library each preloads.
ALLOCATOR_PACKAGES = {"tcmalloc": "libgoogle-perftools4", "jemalloc": "libjemalloc2"}
_ALLOCATOR_LIBS = {"tcmalloc": ("libtcmalloc.so.4", "libtcmalloc_minimal.so.4", "libtcmalloc.so"),
                   "jemalloc": ("libjemalloc.so.2", "libjemalloc.so")}
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib", f"{sys.prefix}/lib")

AUTO_ALLOCATOR = "tcmalloc"  # what cpu.allocator=auto preloads where it is installed (see conf/cpu/default.yaml)


def find_allocator(name: str) -> str | None:
    """Path of the allocator's shared library on this machine, or None (``auto``: tcmalloc's, where
    installed, else None: the system's malloc)."""
    if name == "auto":
        name = AUTO_ALLOCATOR
    if name == "system":
        return None
    for d in _LIB_DIRS:
        for lib in _ALLOCATOR_LIBS[name]:
            p = Path(d) / lib
            if p.is_file():
                return str(p)
    return None


def allocators_found() -> dict[str, str | None]:
    return {name: find_allocator(name) for name in _ALLOCATOR_LIBS}


def allocator_in_effect(maps: Path = Path("/proc/self/maps")) -> str:
    """Which malloc this process really uses, from the libraries mapped into it."""
    try:
        text = maps.read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in text:
            return name
    return "system"


def main() -> None:
    facts = probe()
    found = allocators_found()
    print(json.dumps({**facts, "allocators": {"system": "glibc", **found},
                      "suggested_cpu_profile": suggest(facts, found)}, indent=2))


if __name__ == "__main__":
    main()
