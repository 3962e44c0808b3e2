"""A small hand-made study for the report tests: result.json records and the same trials in an
Optuna journal, with repeats, a failure, a pruned trial and one below the untuned model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from src.sweeper import study as S

STUDY = "handmade"
OBJECTIVES = [{"name": "eval/rougeL", "direction": "maximize"}, {"name": "cost/train_s", "direction": "minimize"}]
BASELINE = {"baseline/loss": 3.0, "baseline/rougeL": 0.10}
CPU = {"model": "Test CPU 9000", "logical_cpus": 2, "usable_cores": 2, "numa_nodes": 1,
       "flags": {"amx_tile": False, "avx512_vnni": True, "avx2": True}}
PACKAGES = {"python": "3.11.7", "torch": "2.13.0+cpu", "optuna": "5.0.0"}
DISTRIBUTIONS = {"lora.r": IntDistribution(2, 32), "train.lr": FloatDistribution(1e-4, 1e-2, log=True),
                 "quant": CategoricalDistribution(["none", "bnb_nf4"])}

# number, status, (lora.r, train.lr, quant), rougeL, train_s, error
TRIALS: list[tuple[int, str, tuple[int, float, str], float | None, float | None, str | None]] = [
    (0, "completed", (8, 0.001, "none"), 0.20, 100.0, None),
    (1, "completed", (16, 0.001, "none"), 0.25, 150.0, None),
    (2, "completed", (32, 0.001, "none"), 0.26, 300.0, None),
    (3, "completed", (4, 0.001, "none"), 0.15, 120.0, None),          # dominated by #0
    (4, "failed", (32, 0.002, "bnb_nf4"), None, None,
     "worker killed by SIGKILL (often the kernel's out-of-memory killer)"),
    (5, "completed", (16, 0.001, "none"), 0.23, 160.0, None),          # a repeat of #1: merged with it
    (6, "completed", (2, 0.001, "none"), 0.08, 50.0, None),            # below the untuned model: infeasible
    (7, "pruned", (8, 0.003, "bnb_nf4"), None, None, "no better than the median at step 4"),
    (8, "completed", (8, 0.001, "bnb_nf4"), 0.19, 90.0, None),
]


def _overrides(params: tuple[int, float, str]) -> list[str]:
    r, lr, q = params
    return [f"lora.r={r}", f"train.lr={lr}", f"quant={q}"]


def record(number: int, status: str, params: tuple[int, float, str], rouge: float | None,
           train_s: float | None, error: str | None, trial_dir: Path) -> dict[str, Any]:
    r, lr, q = params
    metrics: dict[str, float] = {}
    if rouge is not None and train_s is not None:
        metrics = {"eval/rougeL": rouge, "eval/loss": 3.2 - rouge, "cost/train_s": train_s,
                   "cost/eval_s": 40.0, "cost/total_s": train_s + 40.0 + 12.0,
                   "cost/peak_rss_mb": 4000.0 + 50 * r + (0 if q == "none" else -500),
                   "cost/usd": (train_s + 52.0) / 3600 * 0.25, "cost/energy_wh": (train_s + 52.0) / 30,
                   "train/tokens_per_s": 12000.0 / train_s}
    return {
        "status": status,
        "trial": {"id": f"sweep-{number}", "overrides": ["sweep=none", *_overrides(params)],
                  "study": {"name": STUDY, "trial": number, "params": {"lora.r": r, "train.lr": lr, "quant": q}},
                  "dir": str(trial_dir)},
        "config": {"lora": {"r": r, "alpha": None}, "train": {"lr": lr}, "quant": {"name": q},
                   "objectives": OBJECTIVES, "study": {"name": STUDY, "trial": number},
                   "paths": {"cache_dir": "/tmp/cache"}},
        "metrics": metrics, "baseline": dict(BASELINE), "gains": {},
        "objectives": {"eval/rougeL": rouge, "cost/train_s": train_s} if status == "completed" else {},
        "error": {"type": "WorkerDied", "message": error} if error else None,
        "cpu": CPU, "environment": {"packages": PACKAGES},
        # what the worker took: train and eval (40 s) and 12 s around them; less for those that stopped
        "timings": {"worker_wall_s": train_s + 52.0 if train_s is not None else {"pruned": 30.0}.get(status, 20.0)},
    }


def write_records(root: Path) -> Path:
    """One folder per trial, as a sweep leaves them: root/<n>/result.json."""
    for number, status, params, rouge, train_s, error in TRIALS:
        tdir = root / str(number)
        tdir.mkdir(parents=True, exist_ok=True)
        (tdir / "result.json").write_text(json.dumps(record(number, status, params, rouge, train_s, error, tdir)))
    return root


def write_study(root: Path, storage: str) -> optuna.Study:
    """The same trials in an Optuna study, with the user attrs the sweepers set."""
    write_records(root)
    study = optuna.create_study(study_name=STUDY, storage=S.open_storage(storage),
                                directions=[o["direction"] for o in OBJECTIVES])
    study.set_metric_names([o["name"] for o in OBJECTIVES])
    states = {"completed": TrialState.COMPLETE, "failed": TrialState.FAIL, "pruned": TrialState.PRUNED}
    for number, status, params, rouge, train_s, error in TRIALS:
        r, lr, q = params
        attrs: dict[str, Any] = {S.RESULT_PATH: str((root / str(number) / "result.json").resolve()),
                                 S.STATUS: status, S.OVERRIDES: ["sweep=none", *_overrides(params)]}
        if error:
            attrs[S.ERROR] = error
        study.add_trial(optuna.trial.create_trial(
            params={"lora.r": r, "train.lr": lr, "quant": q}, distributions=DISTRIBUTIONS,
            values=[rouge, train_s] if status == "completed" else None, state=states[status], user_attrs=attrs))
    return study
