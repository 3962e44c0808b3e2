"""Hydra callbacks: the table of all trials printed when a multirun ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from src import metrics as M
from src.results import RESULT_FILE

COLUMNS = (M.EVAL_ROUGE[2], M.gain_name(M.EVAL_ROUGE[2]), M.EVAL_BERTSCORE_F1, M.EVAL_LOSS,
           M.COST_TRAIN_S, M.TRAIN_TOKENS_PER_S, M.COST_PEAK_RSS_MB, M.COST_USD)


def _job_num(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), name) if name.isdigit() else (1 << 30, name)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every trial record under a sweep directory, in job order."""
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{RESULT_FILE}"), key=_job_num)]


def format_table(records: list[dict[str, Any]]) -> str:
    """Params, quality and cost of each trial; failed trials show their reason. No dataset text."""
    header = ["#", "status", "overrides", *COLUMNS]
    rows = []
    for r in records:
        values = {**r.get("metrics", {}), **r.get("gains", {})}
        cells = [f"{values[c]:.4g}" if c in values else "-" for c in COLUMNS]
        status = r["status"]
        if status != "completed":
            status = f"{status}: {(r.get('error') or {}).get('message', '')}"[:60]
        overrides = " ".join(r["trial"].get("overrides", [])) or "(defaults)"
        rows.append([str(r["trial"].get("job_num", "")), status, overrides, *cells])
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
