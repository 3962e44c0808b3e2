"""What a trial cost: peak memory, adapter size, energy (RAPL when readable, else estimated) and USD."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src import metrics as M

_RAPL = Path("/sys/class/powercap")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _hwm_mb() -> float | None:
    """The kernel's high-water mark of this process's RSS (VmHWM), since it started or was last reset."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_resettable() -> bool:
    """Whether this kernel lets a process reset its peak RSS (PhasePeaks), checked without resetting it."""
    return _hwm_mb() is not None and os.access(_CLEAR_REFS, os.W_OK)


class PhasePeaks:
    """Peak RSS per phase of a trial (load, baseline, train, eval), besides the trial's whole peak.

    The whole peak hides where it happened: loading a safetensors checkpoint maps every shard, and the
    pages read stay in RSS until the loader closes the files (measured: a 3B bf16 checkpoint added 5.5
    GB of file pages on top of a 4-bit model being built, so the trial peaked at load, not in training).
    Those pages are clean and the kernel can drop them under pressure; what training holds is anonymous
    memory it cannot. Linux keeps a high-water mark of the process's RSS (VmHWM) and resets it to the
    current RSS when "5" is written to /proc/self/clear_refs, so each phase's peak is read, then the
    mark reset; the whole peak is the highest phase. (ru_maxrss, used before, also counts the peak of
    the process image before exec: the parent's at the fork.) Where the kernel refuses the reset,
    ``per_phase`` is False and only the whole peak is reported."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.per_phase = self._reset() if _hwm_mb() is not None else False  # known before any work

    @staticmethod
    def _reset() -> bool:
        try:
            _CLEAR_REFS.write_text("5")
            return True
        except OSError:
            return False

    def end(self, phase: str) -> None:
        """The peak since the last phase ended (or the process started) is ``phase``'s."""
        hwm = _hwm_mb()
        if hwm is None:
            self.per_phase = False
            return
        self.phases[phase] = round(max(self.phases.get(phase, 0.0), hwm), 1)
        if self.per_phase:
            self.per_phase = self._reset()

    def peak_mb(self) -> float:
        """The trial's whole peak: the highest phase, or what the kernel reports when none was read."""
        now = _hwm_mb()
        return peak_rss_mb() if now is None else round(max([now, *self.phases.values()]), 1)

    def describe(self) -> dict[str, object]:
        return {"per_phase": self.per_phase, "phases": dict(self.phases) if self.per_phase else {}}


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def _rapl_domains() -> list[Path]:
    """Top-level package domains (intel-rapl:0, intel-rapl:1, ...), not their sub-zones."""
    return sorted(p for p in _RAPL.glob("intel-rapl:*") if p.name.count(":") == 1)


def _read_uj(domain: Path) -> int | None:
    try:
        return int((domain / "energy_uj").read_text())
    except (OSError, ValueError):
        return None


@dataclass
class EnergyMeter:
    """Package energy between start() and stop() from RAPL counters, when this user may read them."""

    start_uj: dict[Path, int]

    @classmethod
    def start(cls) -> EnergyMeter:
        readings = {d: _read_uj(d) for d in _rapl_domains()}
        return cls({d: v for d, v in readings.items() if v is not None})

    def stop_wh(self) -> float | None:
        if not self.start_uj:
            return None
        total = 0
        for domain, before in self.start_uj.items():
            after = _read_uj(domain)
            if after is None:
                return None
            if after < before:  # the counter wrapped around
                after += int((domain / "max_energy_range_uj").read_text())
            total += after - before
        return total / 3.6e9


def price(total_s: float, measured_wh: float | None, ccfg: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """cost/usd and cost/energy_wh for ``total_s`` seconds of this machine, and how they were derived."""
    if measured_wh is not None:
        energy_wh, source = measured_wh, "measured (RAPL)"
    else:
        energy_wh, source = ccfg.cpu_watts * total_s / 3600, f"estimated ({ccfg.cpu_watts:g} W x wall time)"
    if ccfg.cloud_usd_per_hour is not None:
        hourly, basis = ccfg.cloud_usd_per_hour, "cloud price per hour"
        electricity = 0.0  # included in a cloud price
    else:
        hourly, basis = ccfg.hardware_usd / ccfg.amortization_hours, "hardware amortization"
        electricity = energy_wh / 1000 * ccfg.electricity_usd_per_kwh
    usd = hourly * total_s / 3600 + electricity
    info = {"energy_source": source, "usd_per_hour": hourly, "usd_basis": basis, "electricity_usd": electricity}
    return {M.COST_USD: usd, M.COST_ENERGY_WH: energy_wh}, info
