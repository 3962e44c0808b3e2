"""paretune's job reader (``hydra.sweeper.record: src.sweeper.records.read``): a trial's outcome is its
result.json, not the task function's return value.

The record outlives the process that wrote it, so a trial whose worker finished just before the sweep
was interrupted keeps its values, and a failed trial keeps the reason its worker wrote. The trial
also gets the record's path and all its metrics as user attrs: analysis then needs only the study.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn

from src import results
from src.sweeper import pruning
from src.sweeper import study as S
from src.sweeper.jobs import JobOutcome, job_error


def read(out_dir: Path, ret: JobReturn | None, names: Sequence[str]) -> JobOutcome:
    path = out_dir / results.RESULT_FILE
    attrs: dict[str, Any] = {S.RESULT_PATH: str(path.resolve())}
    failure = job_error(ret)
    if failure is not None:
        return JobOutcome(None, failure, attrs)
    record, why = results.load(path)
    if record is None:
        return JobOutcome(None, f"no readable {path.name} ({why})", attrs)
    if record.get("status") == "pruned":  # stopped by the study's pruner (src/relay.py); its cost so far is kept
        attrs[S.METRICS] = dict(record.get("metrics", {}))
        return JobOutcome(None, pruning.reason(pruning.record_step(record)), attrs, pruned=True)
    values, reason = record_values(record, names)
    if values is not None:
        # all of them: a few dozen numbers, and analysis then needs nothing but the study
        attrs[S.METRICS] = {**record.get("metrics", {}), **record.get("gains", {})}
    return JobOutcome(values, reason, attrs)


def record_values(record: dict[str, Any], names: Sequence[str]) -> tuple[list[float] | None, str | None]:
    """The objective values of a completed trial's record, or the reason it has none."""
    if record.get("status") != "completed":
        return None, (record.get("error") or {}).get("message") or f"status {record.get('status')}"
    objectives = record.get("objectives", {})
    missing = [n for n in names if n not in objectives]
    if missing:
        return None, f"result has no value for objective(s) {missing}"
    values = [float(objectives[n]) for n in names]
    if not all(math.isfinite(v) for v in values):
        return None, f"non-finite objective values {values}"
    return values, None
