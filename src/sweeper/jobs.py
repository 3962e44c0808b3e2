"""What a finished Hydra job means to the study: objective values, or the reason it failed.

The generic reading is the official Optuna sweeper's: the task function's return value is the
objective (a float, or a sequence with one float per direction), an exception raised by the job
fails the trial with its message, and ``optuna.TrialPruned`` raised by the job prunes it. An app can
instead name a reader in ``hydra.sweeper.record`` (paretune's reads each trial's result.json, see
``src/sweeper/records.py``): it is called with the
job's output folder, its JobReturn (None when the launcher stopped before returning it) and the
objective names, and returns a ``JobOutcome``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from optuna import TrialPruned

from src.redact import scrub_text


@dataclass
class JobOutcome:
    values: list[float] | None                 # None: the trial failed (or was pruned), ``error`` says why
    error: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)  # extra user attrs for the trial (result_path, metrics)
    pruned: bool = False                       # stopped by the study's pruner (src/sweeper/pruning.py)


def job_error(ret: JobReturn | None) -> str | None:
    """The exception a failed job raised, as ``Type: message`` (secrets masked); None if it did not fail."""
    if ret is None or ret.status != JobStatus.FAILED:
        return None
    error = ret._return_value  # noqa: SLF001 - reading .return_value would re-raise it
    return scrub_text(f"{type(error).__name__}: {error}".strip())


def from_return(out_dir: Path, ret: JobReturn | None, names: Sequence[str]) -> JobOutcome:
    """The task function's return value as the objective values (Hydra's Optuna sweeper's contract)."""
    if ret is not None and ret.status == JobStatus.FAILED and isinstance(ret._return_value, TrialPruned):  # noqa: SLF001
        return JobOutcome(None, scrub_text(str(ret._return_value) or "pruned"), pruned=True)  # noqa: SLF001
    error = job_error(ret)
    if error is not None:
        return JobOutcome(None, error)
    if ret is None:
        return JobOutcome(None, "the job did not return (the launcher stopped first)")
    value = ret.return_value
    many = isinstance(value, Iterable) and not isinstance(value, str | bytes)  # a list, tuple, array, tensor
    try:
        if len(names) == 1 and not many:
            values = [float(value)]
        elif many:
            values = [float(v) for v in value]
        else:
            raise TypeError
    except (TypeError, ValueError):
        shape = "a float" if len(names) == 1 else f"a list or tuple of {len(names)} floats"
        return JobOutcome(None, f"the task function returned {value!r}; it must return {shape} "
                                f"(one value per hydra.sweeper.direction)")
    if len(values) != len(names):
        return JobOutcome(None, f"the task function returned {len(values)} value(s) for {len(names)} objective(s) "
                                f"{list(names)}")
    if not all(math.isfinite(v) for v in values):
        return JobOutcome(None, f"non-finite objective values {values}")
    return JobOutcome(values)
