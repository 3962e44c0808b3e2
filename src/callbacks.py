"""Hydra callbacks: the table of all trials printed when a multirun ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from src import metrics as M
from src import results
from src.redact import scrub_text

COLUMNS = (M.EVAL_ROUGE[2], M.gain_name(M.EVAL_ROUGE[2]), M.EVAL_BERTSCORE_F1, M.EVAL_LOSS,
           M.COST_TRAIN_S, M.TRAIN_TOKENS_PER_S, M.COST_PEAK_RSS_MB, M.COST_USD)


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


def format_table(records: list[dict[str, Any]]) -> str:
    """Params, quality and cost of each trial; failed trials show their reason. No dataset text.
    Overrides and reasons pass through scrub_text: a storage URL on the command line keeps its
    password out of the table."""
    header = ["#", "status", "overrides", *COLUMNS]
    rows = []
    for r in records:
        values = {**(r.get("metrics") or {}), **(r.get("gains") or {})}
        cells = [f"{values[c]:.4g}" if isinstance(values.get(c), int | float) else "-" for c in COLUMNS]
        status = str(r.get("status"))
        if status != "completed":
            status = scrub_text(f"{status}: {(r.get('error') or {}).get('message', '')}")[:60]
        overrides = scrub_text(" ".join(str(o) for o in (r.get("trial") or {}).get("overrides", []))) or "(defaults)"
        rows.append([trial_number(r), status, overrides, *cells])
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
            print(f"\n{len(records)} trials in {sweep_dir}:\n{format_table(records)}\n", flush=True)
