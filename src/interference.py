"""How much of the machine other processes used while a trial ran, and a training time they cannot
inflate.

A wall-clock cost measured on a shared machine says as much about the neighbours as about the
configuration. Between two snapshots, /proc/stat gives the CPU seconds every process on the machine
used (and the time the hypervisor gave this VM's CPUs to other guests, "steal"), and getrusage the
seconds this process and its children used; the difference is the others' share. Pure arithmetic
apart from ``snapshot``.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A stage counts as measured on a busy machine when others used more than this share of its CPUs, or
# the hypervisor stole more than this share of their time.
BUSY_OTHERS_SHARE = 0.10
BUSY_STEAL_SHARE = 0.05


@dataclass(frozen=True)
class Snapshot:
    wall_s: float
    busy_s: float | None     # CPU seconds of every process on the machine (all CPUs), None if unreadable
    steal_s: float | None
    total_s: float | None    # every CPU's seconds, busy or idle
    cpus: int
    own_cpu_s: float         # this process and its waited-for children


def _proc_stat(path: Path) -> tuple[float, float, float, int] | None:
    """(busy, steal, total) seconds summed over CPUs, and the CPU count, from /proc/stat."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    fields = [int(x) for x in lines[0].split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user.
    fields += [0] * (8 - len(fields))
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    hz = os.sysconf("SC_CLK_TCK")
    busy = user + nice + system + irq + softirq
    return busy / hz, steal / hz, (busy + idle + iowait + steal) / hz, max(cpus, 1)


def snapshot(stat: Path = Path("/proc/stat")) -> Snapshot:
    machine = _proc_stat(stat)
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    if machine is None:
        return Snapshot(time.perf_counter(), None, None, None, os.cpu_count() or 1, own)
    busy, steal, total, cpus = machine
    return Snapshot(time.perf_counter(), busy, steal, total, cpus, own)


def between(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """What happened on the machine from ``a`` to ``b``: wall and own CPU seconds, the share of the
    machine's CPU time that other processes used, the share stolen by the hypervisor, and ``busy``."""
    wall = max(b.wall_s - a.wall_s, 1e-9)
    out: dict[str, Any] = {"wall_s": wall, "own_cpu_s": b.own_cpu_s - a.own_cpu_s, "cpus": b.cpus}
    if None in (a.busy_s, b.busy_s, a.total_s, b.total_s):
        out.update(others_cpu_share=None, steal_share=None, busy=None)
        return out
    total = max(b.total_s - a.total_s, 1e-9)
    others = max(0.0, (b.busy_s - a.busy_s) - out["own_cpu_s"])
    out["others_cpu_share"] = min(1.0, others / total)
    out["steal_share"] = min(1.0, max(0.0, (b.steal_s - a.steal_s) / total))
    out["busy"] = out["others_cpu_share"] > BUSY_OTHERS_SHARE or out["steal_share"] > BUSY_STEAL_SHARE
    return out


def robust_train_s(step_s: list[float], step_tokens: list[int]) -> float | None:
    """Training seconds at the trial's median seconds per token, times its tokens: what the loop would
    have taken had every step run at its typical speed. A neighbour that slows some steps (fewer than
    half) moves the median little, where it adds its whole slowdown to the wall time; the per-token
    rate keeps long and short length-grouped batches comparable."""
    rates = [s / t for s, t in zip(step_s, step_tokens, strict=True) if t > 0]
    if not rates:
        return None
    return statistics.median(rates) * sum(step_tokens)
