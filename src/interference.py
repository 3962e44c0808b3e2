"""How much of the machine other processes used while a trial ran, and a training time they cannot
inflate.

A wall-clock cost measured on a shared machine says as much about the neighbours as about the
configuration. Between two snapshots, /proc/stat gives the CPU seconds every process on the machine
used (and the time the hypervisor gave this VM's CPUs to other guests, "steal"), and getrusage the
seconds this process and its children used; the difference is the others' share. Pure arithmetic
apart from ``snapshot``.
"""

from __future__ import annotations

import bisect
import os
import resource
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A stage counts as measured on a busy machine when others used more than this share of its CPUs, or
# the hypervisor stole more than this share of their time.
BUSY_OTHERS_SHARE = 0.10
BUSY_STEAL_SHARE = 0.05
# Fewer quiet steps than this say too little about the configuration's speed: the median of all
# steps is used instead.
MIN_QUIET_STEPS = 3


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
    if (a.busy_s is None or b.busy_s is None or a.total_s is None or b.total_s is None
            or a.steal_s is None or b.steal_s is None):
        out.update(others_cpu_share=None, steal_share=None, busy=None)
        return out
    total = max(b.total_s - a.total_s, 1e-9)
    others = max(0.0, (b.busy_s - a.busy_s) - out["own_cpu_s"])
    out["others_cpu_share"] = min(1.0, others / total)
    out["steal_share"] = min(1.0, max(0.0, (b.steal_s - a.steal_s) / total))
    out["busy"] = out["others_cpu_share"] > BUSY_OTHERS_SHARE or out["steal_share"] > BUSY_STEAL_SHARE
    return out


class Sampler:
    """Snapshots taken every ``interval_s`` on a background thread while a stage runs, so that each
    training step can be told apart as quiet or shared (a step lasts seconds; reading /proc/stat takes
    microseconds). Used as a context manager; ``samples`` holds the snapshots in time order."""

    def __init__(self, interval_s: float = 0.25, stat: Path = Path("/proc/stat")) -> None:
        self.interval_s, self.stat = interval_s, stat
        self.samples: list[Snapshot] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="interference-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(snapshot(self.stat))

    def __enter__(self) -> Sampler:
        self.samples.append(snapshot(self.stat))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(snapshot(self.stat))


def step_shares(samples: list[Snapshot], step_end: list[float], step_s: list[float]) -> list[float | None]:
    """Other processes' share of the machine (others' CPU plus steal) during each step, from the
    samples that enclose it (the last one at or before its start, the first at or after its end).
    None where the samples do not cover the step or /proc/stat was unreadable."""
    walls = [s.wall_s for s in samples]
    out: list[float | None] = []
    for end, dt in zip(step_end, step_s, strict=True):
        i = bisect.bisect_right(walls, end - dt) - 1
        j = bisect.bisect_left(walls, end)
        if i < 0 or j >= len(samples) or i >= j:
            out.append(None)
            continue
        b = between(samples[i], samples[j])
        out.append(None if b["others_cpu_share"] is None else b["others_cpu_share"] + b["steal_share"])
    return out


def quiet_steps(shares: list[float | None]) -> list[bool]:
    """Steps during which others used at most BUSY_OTHERS_SHARE of the machine."""
    return [s is not None and s <= BUSY_OTHERS_SHARE for s in shares]


def robust_train_s(step_s: list[float], step_tokens: list[int], quiet: list[bool] | None = None) -> float | None:
    """Training seconds at the trial's median seconds per token, times its tokens: what the loop would
    have taken had every step run at its typical speed on a quiet machine. The median is taken over
    the quiet steps when at least MIN_QUIET_STEPS of them were measured (a neighbour slows a step, it
    never speeds one up, so the quiet steps are the configuration's own speed however many steps the
    neighbour covered); else over all steps, which resists a neighbour that slowed fewer than half of
    them. The per-token rate keeps long and short length-grouped batches comparable."""
    pairs = [(s / t, q) for s, t, q in zip(step_s, step_tokens, quiet or [True] * len(step_s), strict=True)
             if t > 0]
    if not pairs:
        return None
    quiet_rates = [r for r, q in pairs if q]
    rates = quiet_rates if len(quiet_rates) >= MIN_QUIET_STEPS else [r for r, _ in pairs]
    return statistics.median(rates) * sum(step_tokens)
