"""Tracking, derived from result.json after the worker has finished: one line in the sweep's local
trials.jsonl, and one W&B run per trial (offline by default, files kept in the trial dir).

Tracking never decides whether a trial succeeded: any failure here is a warning, and the record
on disk stays the truth. No dataset or generated text is sent unless logger.log_text is true.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from src import metrics as M
from src import results
from src.redact import scrub
from src.results import TrialResult

log = logging.getLogger(__name__)

LOCAL_LOG = "trials.jsonl"
_WANDB_DIR_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")


def summary_row(result: TrialResult) -> dict[str, Any]:
    """The text-free summary of a trial: what goes to trials.jsonl and the sweep table."""
    return {
        "trial": result.trial.get("id"), "dir": result.trial.get("dir"), "status": result.status,
        "overrides": result.trial.get("overrides", []), "objectives": result.objectives,
        "metrics": result.metrics, "baseline": result.baseline, "gains": result.gains,
        "error": (result.error or {}).get("message"),
    }


def append_local(result: TrialResult, path: Path) -> None:
    # One write() of one line with O_APPEND: concurrent workers' lines do not interleave.
    line = (json.dumps(scrub(summary_row(result))) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@contextlib.contextmanager
def wandb_dirs(trial_dir: Path) -> Iterator[None]:
    """Point every W&B directory into the trial dir (otherwise it also writes under $HOME)."""
    saved = {k: os.environ.get(k) for k in _WANDB_DIR_VARS}
    for k in _WANDB_DIR_VARS:
        os.environ[k] = str(trial_dir / ("wandb" if k == "WANDB_DIR" else ".wandb-" + k[6:-4].lower()))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _train_rows(trial_dir: Path, result: TrialResult) -> list[dict[str, float]]:
    name = result.artifacts.get("train_log")
    return results.read_jsonl(trial_dir / name) if name else []


def wandb_settings() -> Any:
    """What W&B may collect: the metrics and config we log, nothing from the machine or the process.
    No console capture (it would copy the log), no system stats, no git state or code, and no
    metadata (x_disable_meta): that holds the command line, which can carry a storage password."""
    import wandb

    return wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, disable_git=True,
                          save_code=False, silent=True)


def log_wandb(result: TrialResult, trial_dir: Path, lcfg: Any) -> None:
    import wandb

    study = result.trial.get("study") or {}
    group = lcfg.group or study.get("name") or result.trial.get("group")
    config = {**result.config, "trial": {k: result.trial.get(k) for k in ("id", "overrides", "job_num")}}
    if study.get("name"):
        config["study"] = study  # name, Optuna trial number and the searched params
    with wandb_dirs(trial_dir):
        run = wandb.init(project=lcfg.project, entity=lcfg.entity, group=group, name=result.trial.get("id"),
                         job_type="trial", config=config, mode=lcfg.mode, dir=str(trial_dir),
                         reinit="create_new", settings=wandb_settings())
        try:
            for row in _train_rows(trial_dir, result):
                step = int(row.pop("step"))
                run.log(row, step=step)
            intervals = {M.interval_name(k): v for k, v in result.intervals.items()}
            run.summary.update({**result.metrics, **result.baseline, **result.gains, **intervals,
                                "status": result.status})
            if result.error:
                run.summary["error"] = result.error.get("message", "")
            if lcfg.log_text and result.artifacts.get("predictions"):
                rows = results.read_jsonl(trial_dir / result.artifacts["predictions"])
                table = wandb.Table(columns=["id", "reference", "prediction"],
                                    data=[[r["id"], r["reference"], r["prediction"]] for r in rows])
                run.log({"eval/predictions": table})
        finally:
            run.finish(exit_code=0 if result.status == "completed" else 1)


def track(result: TrialResult, trial_dir: Path, lcfg: Any) -> list[str]:
    """Record the trial locally and in W&B; returns warnings instead of raising."""
    warnings = []
    try:
        append_local(result, trial_dir.parent / LOCAL_LOG)
    except OSError as exc:
        warnings.append(f"could not append to {trial_dir.parent / LOCAL_LOG}: {exc}")
    if str(lcfg.backend) == "wandb" and str(lcfg.mode) != "disabled":
        try:
            log_wandb(result, trial_dir, lcfg)
        except Exception as exc:  # noqa: BLE001 - W&B trouble must not fail a recorded trial
            warnings.append(f"W&B logging failed ({type(exc).__name__}: {exc}); the trial is recorded in "
                            f"{trial_dir / 'result.json'}")
    for w in warnings:
        log.warning(w)
    return warnings
