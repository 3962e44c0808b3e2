"""What a finished sweep leaves behind: optimization_results.yaml and one W&B summary run.

The file keeps the shape of Hydra's Optuna sweeper (``best_params`` / ``best_value`` for one
objective, ``solutions`` for several) so existing tooling reads it; the W&B run puts the Pareto
table and a cost/quality scatter next to the trials' own runs (same group: the study name).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from src.sweeper import pruning
from src.sweeper.study import METRICS, RESULT_PATH, unique_pareto

log = logging.getLogger("paretune.sweeper")
RESULTS_FILE = "optimization_results.yaml"


def results(study: optuna.Study, names: list[str] | None) -> dict[str, Any]:
    """``names``: the app's declared objectives (values are then keyed by name), or None (a list of values,
    in ``direction`` order, as Hydra's Optuna sweeper writes them)."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    directions = [d.name.lower() for d in study.directions]
    out: dict[str, Any] = {
        "name": "optuna", "study_name": study.study_name,
        "objectives": ([{"name": n, "direction": d} for n, d in zip(names, directions, strict=True)] if names
                       else directions),
        "trials": {s.name.lower(): states.count(s) for s in TrialState if states.count(s)},
    }
    pruned = pruning.pruned_steps(study.get_trials(deepcopy=False))
    if pruned:  # the step each stopped at (its last reported one)
        out["pruned"] = [{"trial": n, "step": step} for n, step in sorted(pruned.items())]
    if not any(s == TrialState.COMPLETE for s in states):
        out["note"] = "no trial completed: there is no best point yet"
        return out
    if len(directions) == 1:
        best = study.best_trial
        out.update(best_params=dict(best.params), best_value=best.values[0], best_trial=best.number,
                   **_result(best))
    else:
        out["solutions"] = [{"trial": t.number, "params": dict(t.params),
                             "values": ({n: float(v) for n, v in zip(names, t.values, strict=True)} if names
                                        else [float(v) for v in t.values]),
                             **_result(t, "result")} for t in unique_pareto(study)]
    return out


def _result(t: optuna.trial.FrozenTrial, key: str = "best_result") -> dict[str, Any]:
    """The trial's record path, where the app keeps one (paretune's record hook)."""
    return {key: t.user_attrs[RESULT_PATH]} if RESULT_PATH in t.user_attrs else {}


def write_results(path: Path, study: optuna.Study, names: list[str] | None) -> dict[str, Any]:
    data = results(study, names)
    OmegaConf.save(OmegaConf.create(data), path)
    log.info("wrote %s", path)
    return data


def _rows(study: optuna.Study, names: list[str]) -> tuple[list[str | int], list[list[Any]]]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in unique_pareto(study)} if complete else set()
    keys = sorted({k for t in complete for k in t.params})
    extra = sorted({k for t in complete for k in t.user_attrs.get(METRICS, {}) if k not in names})
    columns: list[str | int] = ["trial", "pareto", *keys, *names, *extra]
    rows = [[t.number, t.number in front, *[str(t.params.get(k)) for k in keys], *t.values,
             *[t.user_attrs.get(METRICS, {}).get(k) for k in extra]] for t in complete]
    return columns, rows


def wandb_summary(study: optuna.Study, names: list[str], sweep_dir: Path, config: Any) -> None:
    """One run (job_type "study") with the trials table and the front's scatter; never fails the sweep.
    paretune's ``summary`` hook: the W&B settings are the app's ``logger`` node."""
    logger = config.get("logger")
    if logger is None:
        return
    logger = OmegaConf.create(OmegaConf.to_container(logger, resolve=True, enum_to_str=True))
    if logger.backend != "wandb" or logger.mode == "disabled":
        return
    from src.tracking import wandb_dirs, wandb_settings

    try:
        import wandb

        columns, rows = _rows(study, names)
        if not rows:
            return
        with wandb_dirs(sweep_dir):
            run = wandb.init(project=logger.project, entity=logger.entity, group=study.study_name,
                             name=f"{study.study_name}-summary", job_type="study", mode=logger.mode,
                             dir=str(sweep_dir), reinit="create_new",
                             config={"study": study.study_name, "objectives": names},
                             settings=wandb_settings())
            try:
                table = wandb.Table(columns=columns, data=rows)
                front = wandb.Table(columns=columns, data=[r for r in rows if r[1]])
                y, x = names[0], names[-1]
                run.log({"study/trials": table, "study/pareto": front,
                         "study/front": wandb.plot.scatter(table, x, y, title=f"{y} vs {x}")})
                run.summary.update({"study/n_complete": len(rows), "study/n_pareto": len(front.data)})
            finally:
                run.finish()
    except Exception as exc:  # noqa: BLE001 - W&B trouble must not undo a finished study
        log.warning("W&B study summary failed (%s: %s); the study itself is complete", type(exc).__name__, exc)
