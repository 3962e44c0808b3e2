"""cfg.cpu -> the worker's process settings, the checks that catch impossible ones, and the read-back
of what is really in effect inside the worker.

Everything here must happen before torch loads in the worker (thread pools, the preloaded
allocator, oneDNN's and MKL's instruction-set caps are read once at library start), which is why a
trial runs in a fresh process and these settings travel as environment variables and CPU affinity.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from src import hw
from src.hw import ALLOCATOR_PACKAGES, allocator_in_effect, find_allocator

# One ISA level -> what each library is told, and the CPU flags it needs. oneDNN (bf16 and int8
# kernels), MKL (every fp32 GEMM) and ATen's own vectorised loops each read their own variable; a
# cap on only one of them would leave most of the work uncapped.
ISA_LEVELS: dict[str, dict[str, Any]] = {
    "avx2": {"onednn": "AVX2", "mkl": "AVX2", "aten": "avx2", "flags": ("avx2", "fma")},
    "avx512_core": {"onednn": "AVX512_CORE", "mkl": "AVX512", "aten": "avx512",
                    "flags": ("avx512f", "avx512bw", "avx512vl", "avx512dq")},
    "avx512_core_vnni": {"onednn": "AVX512_CORE_VNNI", "mkl": "AVX512_E1", "aten": "avx512",
                         "flags": ("avx512f", "avx512_vnni")},
    "avx512_core_bf16": {"onednn": "AVX512_CORE_BF16", "mkl": "AVX512_E1", "aten": "avx512",
                         "flags": ("avx512f", "avx512_bf16")},
    "avx512_core_amx": {"onednn": "AVX512_CORE_AMX", "mkl": "AVX512_E4", "aten": "avx512",
                        "flags": ("amx_tile", "amx_bf16")},
}

# Measured on this project's reference machine: bf16 autocast without native bf16 units was 2.4x
# slower than fp32 (DESIGN.md). Recorded in the result so nobody mistakes it for a tuning win.
BF16_EMULATED_NOTE = ("dtype=bf16 on a CPU without avx512_bf16 or amx_bf16: bf16 math is emulated "
                      "(measured 2.4x slower than fp32 on such a CPU)")


def parse_cores(spec: Any) -> list[int] | None:
    """``"0-3"``, ``"0,2,4-5"``, ``[0, 1]`` or a single int -> sorted core ids; None for no pinning."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):  # a list (or OmegaConf ListConfig) of core ids
        return sorted({int(c) for c in spec})
    out: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"cpu.cores: cannot read '{spec}'; write e.g. \"0-3\", \"0,2,4\" or [0, 1]")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"cpu.cores: range '{part}' runs backwards; write it low-high")
        out.update(range(lo, hi + 1))
    return sorted(out)


def check(cpu: Any, errors: list[str], flags: set[str] | None = None, usable: set[int] | None = None) -> None:
    """What this machine cannot do, each as an error naming the key and the fix (before any work)."""
    flags = hw.cpu_flags() if flags is None else flags
    usable = set(os.sched_getaffinity(0)) if usable is None else usable
    allocator = str(cpu.allocator)
    if allocator not in ("system", "auto") and find_allocator(allocator) is None:
        errors.append(f"cpu.allocator: {allocator} is not installed here; install Debian's "
                      f"{ALLOCATOR_PACKAGES[allocator]} (`make setup` does, as root) or use cpu.allocator=system")
    try:
        cores = parse_cores(cpu.cores)
    except ValueError as exc:
        errors.append(str(exc))
        cores = None
    if cores is not None:
        outside = sorted(set(cores) - usable)
        if not cores or outside:
            errors.append(f"cpu.cores: {outside or cores} not among the cores this process may use "
                          f"({hw.format_cores(sorted(usable))})")
    available = len(cores) if cores else len(usable)
    if cpu.threads is not None and cpu.threads > available and not cpu.force:
        errors.append(f"cpu.threads: {cpu.threads} threads on {available} usable cores oversubscribes them "
                      "(each thread waits for the others); lower it or set cpu.force=true")
    isa = str(cpu.isa) if cpu.isa is not None else None
    if isa is not None:
        missing = [f for f in ISA_LEVELS[isa]["flags"] if f not in flags]
        if missing:
            below = [k for k, v in ISA_LEVELS.items() if all(f in flags for f in v["flags"])]
            errors.append(f"cpu.isa: {isa} needs CPU flags {missing} that this CPU lacks; "
                          f"choose one of {below or ['(none: leave cpu.isa=null)']}")


def warnings_for(cpu: Any, flags: set[str] | None = None) -> list[str]:
    """Legal but known-slow settings, recorded in the result next to the measured numbers."""
    flags = hw.cpu_flags() if flags is None else flags
    out = []
    if str(cpu.dtype) == "bf16" and not ({"avx512_bf16", "amx_bf16"} & flags):
        out.append(BF16_EMULATED_NOTE)
    if cpu.omp_proc_bind not in (None, "false") or cpu.kmp_affinity:
        out.append("OpenMP pinning is on: it made a shared 2-core VM 0.64-0.70x slower; compare with it off")
    return out


def threads_for(cpu: Any) -> int:
    """The worker's thread count: cpu.threads, else one per pinned core, else one per usable core."""
    cores = parse_cores(cpu.cores)
    return int(cpu.threads or (len(cores) if cores else hw.usable_cores()))


def env(cpu: Any, threads: int) -> dict[str, str]:
    """Environment variables for the worker: thread pools, OpenMP binding, allocator, ISA caps."""
    out = {"PARETUNE_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads),   # OpenMP pool used by ATen's parallel loops
           "MKL_NUM_THREADS": str(threads)}   # MKL GEMMs (all fp32 matmuls in training)
    if cpu.omp_proc_bind is not None:
        out["OMP_PROC_BIND"] = str(cpu.omp_proc_bind)
    if cpu.omp_places is not None:
        out["OMP_PLACES"] = str(cpu.omp_places)
    if cpu.kmp_affinity:
        out["KMP_AFFINITY"] = str(cpu.kmp_affinity)
    lib = find_allocator(str(cpu.allocator))
    if lib:
        out["LD_PRELOAD"] = lib
        if "tcmalloc" in lib:  # else it prints a stack for every allocation over 1 GB (a large model's embedding)
            out["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] = str(1 << 40)
    if cpu.isa is not None:
        level = ISA_LEVELS[str(cpu.isa)]
        out.update(ONEDNN_MAX_CPU_ISA=level["onednn"], MKL_ENABLE_INSTRUCTIONS=level["mkl"],
                   ATEN_CPU_CAPABILITY=level["aten"])
    return out


def preexec(cpu: Any) -> Callable[[], None] | None:
    """Pin the worker before it starts (OpenMP sizes and binds its pool from the affinity at start)."""
    cores = parse_cores(cpu.cores)
    if cores is None:
        return None
    return lambda: os.sched_setaffinity(0, cores)


# ---- read back inside the worker -----------------------------------------------------------------
def _capture_stdout(fn: Callable[[], None]) -> str:
    """What C libraries print to fd 1 while ``fn`` runs (their verbose modes bypass sys.stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode("utf-8", "replace")


def onednn_isa() -> str:
    """The ISA oneDNN dispatches to, as oneDNN itself reports it (one small convolution, verbose).

    Called straight through ``torch.mkldnn_convolution``: ATen picks its own kernels for small fp32
    convolutions, and oneDNN prints its ISA only when it creates its first primitive."""
    import torch

    def run() -> None:
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            torch.mkldnn_convolution(torch.randn(1, 16, 32, 32), torch.randn(16, 16, 3, 3), None,
                                     [0, 0], [1, 1], [1, 1], 1)

    for line in _capture_stdout(run).splitlines():
        if ",isa:" in line:
            return line.split(",isa:", 1)[1].strip()
    return "not reported"


def mkl_build() -> str:
    """MKL's own header line (it names the instruction set on Intel CPUs; on others, only the build)."""
    import torch

    def run() -> None:
        with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
            _ = torch.randn(64, 64) @ torch.randn(64, 64)

    lines = [x for x in _capture_stdout(run).splitlines() if x.startswith("MKL_VERBOSE") and "SGEMM" not in x]
    return lines[0].removeprefix("MKL_VERBOSE ").strip() if lines else "not reported"


def in_effect(cpu_cfg: Any) -> dict[str, Any]:
    """Settings as this process really has them: read back, never copied from the config."""
    import torch

    facts: dict[str, Any] = dict(hw.probe())
    facts.update(
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        affinity=hw.format_cores(sorted(os.sched_getaffinity(0))),
        allocator=allocator_in_effect(),
        aten_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        onednn_isa=onednn_isa(),
        mkl=mkl_build(),
        dtype=str(cpu_cfg.dtype),
        env={k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES",
                                        "KMP_AFFINITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                        "ATEN_CPU_CAPABILITY", "LD_PRELOAD") if k in os.environ},
        warnings=warnings_for(cpu_cfg),
    )
    return facts
