"""What CPU this is: model, cores, NUMA nodes and the instruction-set flags that decide speed.

Read from /proc and /sys (Linux); used by the worker to record the machine a trial really ran on.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# Flags that change which kernels run fast for training (bf16/int8 matmul units, vector width).
FLAGS_OF_INTEREST = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma")


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


def numa_nodes() -> int:
    nodes = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    return max(1, len(nodes))


def usable_cores() -> int:
    """Cores this process may run on (respects taskset / cgroup cpusets), not the machine's total."""
    return len(os.sched_getaffinity(0))


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


if __name__ == "__main__":
    print(json.dumps(probe(), indent=2))
