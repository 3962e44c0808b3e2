"""A trial's directory: the names of its files and the only code that reads or writes them.

The result record (one result.json per trial) is the single source every report is derived from. It
is written atomically (temp file + rename), so a reader never sees half a record and a crash while
writing leaves the previous state intact. Beside it: the config the worker runs (trial_config.json),
the per-step training log, the predictions, and the worker's own output log.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from src.redact import scrub

SCHEMA_VERSION = 3  # 2: model, baseline, quant, trainable params, stop reason and eval model moved to `run`
#                    3: `intervals` (bootstrap 95% of each quality metric and gain)
RESULT_FILE = "result.json"          # the record
CONFIG_FILE = "trial_config.json"    # the resolved config, written by the parent, read by the worker
TRAIN_LOG = "train_log.jsonl"        # one row per logged training step
PROFILE_FILE = "profile.txt"         # train.profile_steps > 0: where the profiled steps' time went, by operator
PREDICTIONS = "predictions.jsonl"    # id, reference, prediction of every eval example (stays on disk)
PER_EXAMPLE = "per_example.jsonl"    # id and each metric's value per eval example: numbers only, no text
BASELINE_PER_EXAMPLE = "baseline_per_example.jsonl"  # the same for the untuned model
WORKER_LOG = "worker.log"            # the worker's stdout and stderr
SIGNAL_FILE = "signal.jsonl"         # when the sweep prunes: the worker's intermediate values, step by step
PRUNE_FILE = "prune.json"            # written by the parent when the study's pruner stops the trial
DECIDED_FILE = "decided.json"        # the parent's answer to the latest report: {"step", "prune", "next"}
STATUSES = ("completed", "failed", "pruned")


@dataclass
class TrialResult:
    status: str
    trial: dict[str, Any]                 # id, dir, overrides, started_at, finished_at
    config: dict[str, Any]                # the resolved config the worker ran
    metrics: dict[str, float] = field(default_factory=dict)      # namespaced: train/..., eval/..., cost/...
    baseline: dict[str, float] = field(default_factory=dict)     # untuned model: baseline/...
    gains: dict[str, float] = field(default_factory=dict)        # eval minus baseline: gain/...
    intervals: dict[str, list[float]] = field(default_factory=dict)  # metric or gain name: [low, high], 95%
    objectives: dict[str, float] = field(default_factory=dict)   # the declared objectives, in order
    error: dict[str, str] | None = None   # type, message, traceback (failed trials)
    timings: dict[str, float] = field(default_factory=dict)      # phases in seconds
    cost_info: dict[str, Any] = field(default_factory=dict)      # energy_source, usd_per_hour
    data: dict[str, Any] = field(default_factory=dict)           # splits: sizes, truncated, dropped
    run: dict[str, Any] = field(default_factory=dict)            # model, baseline source, quant, trainable
                                                                 # params, stopped_by, eval_model
    cpu: dict[str, Any] = field(default_factory=dict)            # read inside the worker
    environment: dict[str, Any] = field(default_factory=dict)    # versions, git commit, dirty flag
    artifacts: dict[str, str] = field(default_factory=dict)      # relative paths in the trial dir
    seed: int | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        for group in ("metrics", "baseline", "gains", "objectives"):
            for k, v in getattr(self, group).items():
                if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                    raise ValueError(f"{group}[{k!r}] must be a finite number, got {v!r}")
        if self.status == "failed" and not self.error:
            raise ValueError("a failed trial must carry its error")
        if self.status == "completed" and self.error:
            raise ValueError("a completed trial cannot carry an error")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown result fields {sorted(unknown)}")
        return cls(**data)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON next to its destination, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a record gets the usual file mode
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask, read without changing it. The usual idiom (os.umask(0), then set it back)
    opens a window in which a file created by another thread (the sweep's lease renewal, the worker
    log's tee) is world-readable, even under privacy=strict. Linux reports it in /proc/self/status."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o077  # unknown: the strictest usual value, never a window


class RecordError(OSError):
    """A trial's files could not be written (a full disk, a read-only or vanished folder)."""


def write(trial_dir: Path, result: TrialResult) -> Path:
    path = Path(trial_dir) / RESULT_FILE
    try:
        atomic_write_json(path, scrub(result.to_dict()))  # no storage password, whatever a field holds
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc.strerror or exc}; free space or fix the folder, then run the "
                          "same command again (a sweep resumes, earlier records are untouched)") from exc
    return path


def read(trial_dir: Path) -> TrialResult:
    return TrialResult.from_dict(json.loads((Path(trial_dir) / RESULT_FILE).read_text()))


# ---- reading and writing the other files of a trial directory ----------------------------------------
def record_files(path: Path, recursive: bool = False) -> list[Path]:
    """The result.json files a user pointed at: the file itself, or those of a sweep folder's trials
    (``recursive``: at any depth, e.g. a folder of sweeps)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(path.rglob(RESULT_FILE) if recursive else path.glob(f"*/{RESULT_FILE}"))


def load(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A record file as plain JSON: (record, None), or (None, why it cannot be read). The reason names
    the problem and its position only, never the file's text."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or type(exc).__name__})"
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON (cut short or corrupted: {exc.msg} at line {exc.lineno} column {exc.colno})"
    if not isinstance(record, dict):
        return None, f"not a JSON object ({type(record).__name__})"
    return record, None


def write_config(trial_dir: Path, plain: dict[str, Any]) -> Path:
    path = Path(trial_dir) / CONFIG_FILE
    try:
        path.write_text(json.dumps(scrub(plain), indent=2))
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc.strerror or exc}; free space or fix the folder, then run the "
                          "same command again") from exc
    return path


def read_config(trial_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((Path(trial_dir) / CONFIG_FILE).read_text())
    return config


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file of the trial (empty when the file is absent)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_train_log(trial_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(trial_dir) / TRAIN_LOG)
