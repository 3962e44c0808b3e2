"""Hydra callbacks: the table of all trials printed when a multirun ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from src import metrics as M
from src import overrides, results
from src.redact import scrub_text

COLUMNS = (M.EVAL_ROUGE[2], M.gain_name(M.EVAL_ROUGE[2]), M.EVAL_BERTSCORE_F1, M.EVAL_LOSS,
           M.COST_TRAIN_S, M.COST_TRAIN_S_ROBUST, M.TRAIN_TOKENS_PER_S, M.COST_PEAK_RSS_MB, M.COST_USD)


def _job_num(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), name) if name.isdigit() else (1 << 30, name)


def _unreadable(path: Path, why: str) -> dict[str, Any]:
    return {"status": "unreadable", "error": {"message": f"{path}: {why}"}, "trial": {}}


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every trial record under a sweep directory, in job order. A record that cannot be read (cut
    short, hand-edited) is a row saying so, not a traceback at the end of the sweep."""
    out: list[dict[str, Any]] = []
    for path in sorted(results.record_files(sweep_dir), key=_job_num):
        record, why = results.load(path)
        if record is None:
            out.append(_unreadable(path, why or "unreadable"))
            continue
        ok = isinstance(record, dict) and isinstance(record.get("trial", {}), dict)
        out.append(record if ok else _unreadable(path, "not a trial record"))
    return out


def trial_number(record: dict[str, Any]) -> str:
    """The Optuna trial number (what the study, the report and the dashboard call the trial), else
    the Hydra job number: they differ as soon as a study is resumed or shared by several workers."""
    trial = record.get("trial") or {}
    number = (trial.get("study") or {}).get("trial")
    if number is None:
        number = trial.get("job_num")
    return "" if number is None else str(number)


def _overrides(record: dict[str, Any]) -> dict[str, str]:
    return overrides.texts(str(o) for o in (record.get("trial") or {}).get("overrides", []))


def _shared(records: list[dict[str, Any]]) -> dict[str, str]:
    sets = [_overrides(r) for r in records if r.get("trial")]
    if len(sets) < 2:
        return {}
    return {k: v for k, v in sets[0].items() if all(s.get(k) == v for s in sets[1:])}


def fixed_overrides(records: list[dict[str, Any]], shared: dict[str, str] | None = None) -> str:
    """The overrides every trial shares (printed once above the table, not on every row)."""
    return scrub_text(" ".join(f"{k}={v}" for k, v in (_shared(records) if shared is None else shared).items()))


def _cell(value: Any, interval: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    if isinstance(interval, list | tuple) and len(interval) == 2:
        return f"{value:.4g} [{interval[0]:.3g}, {interval[1]:.3g}]"
    return f"{value:.4g}"


def format_table(records: list[dict[str, Any]], shared: dict[str, str] | None = None) -> str:
    """Params, quality (with its 95% interval) and cost of each trial; failed trials show their
    reason. Only the overrides that differ between trials are shown (``fixed_overrides`` has the
    rest). No dataset text. Overrides and reasons pass through scrub_text: a storage URL on the
    command line keeps its password out of the table."""
    header = ["#", "status", "overrides", *COLUMNS, "busy"]
    shared = _shared(records) if shared is None else shared
    rows = []
    for r in records:
        values = {**(r.get("metrics") or {}), **(r.get("gains") or {})}
        intervals = r.get("intervals") or {}
        cells = [_cell(values.get(c), intervals.get(c)) for c in COLUMNS]
        status = str(r.get("status"))
        if status != "completed":
            status = scrub_text(f"{status}: {(r.get('error') or {}).get('message', '')}")[:60]
        own = " ".join(f"{k}={v}" for k, v in _overrides(r).items() if shared.get(k) != v)
        # Costs measured while other processes used the machine (src/interference.py) are suspect.
        busy = ((r.get("cost_info") or {}).get("interference") or {}).get("busy")
        rows.append([trial_number(r), status, scrub_text(own) or "(defaults)", *cells, "yes" if busy else ""])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join
    out = [line(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += [line(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


class SweepTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = collect(sweep_dir)
        if records:
            shared = _shared(records)
            every = f"every trial: {fixed_overrides(records, shared)}\n" if shared else ""
            print(f"\n{len(records)} trials in {sweep_dir} (quality: value [95% interval]):\n{every}"
                  f"{format_table(records, shared)}\n", flush=True)
