"""What a trial cost: peak memory, adapter size, energy (RAPL when readable, else estimated) and USD."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src import metrics as M

_RAPL = Path("/sys/class/powercap")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
