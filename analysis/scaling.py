"""The scaling table: training speed, peak memory, load time and adapter size against model size for each
quantization backend, measured by a scaling study (``+experiment=scaling``), with the planner's
(src/plan.py) predictions beside each measurement.

Speed is the median tokens/s of the steps after the first (which pays for allocations); every other
number is the trial's own record. One row per (model, backend); repeated trials are reduced to their
median and counted, and trials measured on a busy machine are left out where a quiet one exists.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from src import metrics as M
from src import results

SYNTHETIC_BANNER = ("Synthetic models (random weights in public models' shapes): speed and memory only; "
                    "no quality was measured.")


def steady_tokens_per_s(trial_dir: Path) -> float | None:
    """Median training tokens/s over the steps after the first; None without such a step."""
    rows = results.read_train_log(trial_dir)
    values = [float(r[M.TRAIN_TOKENS_PER_S]) for r in rows if int(r["step"]) > 1]
    return statistics.median(values) if values else None


def _backend(record: dict[str, Any]) -> str:
    q = record["run"].get("quant") or {}
    return "fp32" if q.get("backend", "none") == "none" else f"{q['backend']} {q['quant_type']}"


def _busy(record: dict[str, Any]) -> bool:
    return bool((record.get("cost_info") or {}).get("interference", {}).get("busy"))


def rows(records: list[tuple[dict[str, Any], Path]], gemm_gflops: float | None) -> list[dict[str, Any]]:
    """One row per (model, backend): measured medians, the plan, and their ratios."""
    from omegaconf import OmegaConf

    from src import plan

    groups: dict[tuple[str, str], list[tuple[dict[str, Any], Path]]] = defaultdict(list)
    for record, folder in records:
        groups[(record["run"]["model"]["name"], _backend(record))].append((record, folder))
    out: list[dict[str, Any]] = []
    for (name, backend), every in groups.items():
        # a trial measured while other processes took the CPU (cost_info.interference.busy) counts only
        # when its configuration has no quiet one: run the busy ones again to replace them
        quiet = [m for m in every if not _busy(m[0])]
        members = quiet or every
        cfg = OmegaConf.create(members[0][0]["config"])
        planned = plan.plan(cfg, plan.arch_of(cfg.model, Path(cfg.paths.cache_dir)), gemm_gflops)
        speeds = [s for s in (steady_tokens_per_s(f) for _, f in members) if s is not None]

        def median(key: str, where: str = "metrics", members: list[Any] = members) -> float:
            return statistics.median(float(r[where][key]) for r, _ in members)

        peaks = [float(r["metrics"][M.COST_PEAK_RSS_MB]) for r, _ in members]
        # the peak while training, where the records have it (older ones do not): what the plan models,
        # without the checkpoint's file pages that loading maps (src/cost.py PhasePeaks)
        train_peaks = [float(r["metrics"][M.COST_TRAIN_PEAK_RSS_MB]) for r, _ in members
                       if M.COST_TRAIN_PEAK_RSS_MB in r["metrics"]]

        out.append({
            # as the architecture has them (a packed 4-bit layer's own count is not)
            "model": name, "params_b": planned.params_b, "backend": backend,
            "n": len(members), "tokens_per_s": statistics.median(speeds) if speeds else None,
            "tokens_per_s_range": [min(speeds), max(speeds)] if speeds else None,
            "planned_tokens_per_s": planned.tokens_per_s, "peak_rss_mb": median(M.COST_PEAK_RSS_MB),
            "peak_rss_mb_range": [min(peaks), max(peaks)],
            "train_peak_rss_mb": statistics.median(train_peaks) if train_peaks else None,
            "train_peak_rss_mb_range": [min(train_peaks), max(train_peaks)] if train_peaks else None,
            "train_peak_n": len(train_peaks),
            "planned_peak_rss_mb": planned.peak_rss_mb, "load_s": median("load_s", "timings"),
            "adapter_mb": median(M.COST_ADAPTER_MB), "synthetic": "synthetic" in members[0][0]["run"]["model"],
            "busy": not quiet,
        })
    order = {"fp32": 0}
    out.sort(key=lambda r: (r["params_b"], order.get(r["backend"], 1), r["backend"]))
    fp32 = {r["model"]: compared_peak(r) for r in out if r["backend"] == "fp32"}
    for r in out:
        r["rss_vs_fp32"] = compared_peak(r) / fp32[r["model"]] if r["model"] in fp32 else None
    return out


def compared_peak(row: dict[str, Any]) -> float:
    """The peak a row is compared on (with fp32 and with the plan): training's where it was measured."""
    return float(row["train_peak_rss_mb"] if row.get("train_peak_rss_mb") is not None else row["peak_rss_mb"])


def _spread(row: dict[str, Any], key: str, fmt: str) -> str:
    low_high = row.get(key)
    if row["n"] < 2 or not low_high:
        return ""
    return f" [{fmt.format(low_high[0])}-{fmt.format(low_high[1])}]"


def _ratio(measured: float | None, planned: float | None) -> str:
    if measured is None or planned is None:
        return "-"
    return f"{planned:.3g} ({planned / measured:.2f}x)"


def _train_peak(row: dict[str, Any]) -> str:
    """Training's peak, over the trials that recorded it (older records did not): their count when fewer."""
    if row.get("train_peak_rss_mb") is None:
        return "- | "
    n = int(row.get("train_peak_n", row["n"]))
    spread = _spread({**row, "n": n}, "train_peak_rss_mb_range", "{:.0f}")
    return f"{row['train_peak_rss_mb']:.0f}{spread}" + (f" ({n} of {row['n']})" if n < row["n"] else "") + " | "


def table(rs: list[dict[str, Any]], gemm_gflops: float | None, machine: str) -> str:
    """Markdown: the measured numbers with the plan beside (planned / measured in brackets)."""
    head = [f"Measured on {machine}" + (f", fp32 GEMM peak {gemm_gflops:.0f} GFLOP/s" if gemm_gflops else "") + "."]
    if any(r["synthetic"] for r in rs):
        head.append(SYNTHETIC_BANNER)
    if any(r["busy"] for r in rs):
        head.append("Rows marked busy were measured while other processes used the CPU (their speed is low).")
    by_phase = any(r.get("train_peak_rss_mb") is not None for r in rs)
    if by_phase:
        head.append("Peak RSS is the trial's whole; training's own peak (without the checkpoint's pages that "
                    "loading maps) is what vs fp32 and the plan compare.")
    lines = ["| model | parameters | backend | trials | training tokens/s | planned | peak RSS MB | "
             + ("training peak MB | " if by_phase else "") + "vs fp32 | planned | load s | adapter MB |",
             "|---|---|---|---|---|---|---|" + ("---|" if by_phase else "") + "---|---|---|---|"]
    if any(r["n"] > 1 for r in rs):
        head.append("With several trials: their median, and their lowest and highest in brackets.")
    for r in rs:
        speed = "-" if r["tokens_per_s"] is None else (f"{r['tokens_per_s']:.3g}"
                                                       + _spread(r, "tokens_per_s_range", "{:.3g}"))
        vs = "-" if r["rss_vs_fp32"] is None else f"{r['rss_vs_fp32']:.2f}x"
        trials = f"{r['n']} (busy)" if r["busy"] else str(r["n"])
        lines.append(f"| {r['model']} | {r['params_b']:.2f}B | {r['backend']} | {trials} | {speed} | "
                     f"{_ratio(r['tokens_per_s'], r['planned_tokens_per_s'])} | {r['peak_rss_mb']:.0f}"
                     f"{_spread(r, 'peak_rss_mb_range', '{:.0f}')} | " + (_train_peak(r) if by_phase else "")
                     + f"{vs} | {_ratio(compared_peak(r), r['planned_peak_rss_mb'])} | {r['load_s']:.1f} | "
                     f"{r['adapter_mb']:.1f} |")
    return "\n\n".join([" ".join(head), "\n".join(lines)])
