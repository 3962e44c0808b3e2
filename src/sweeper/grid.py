"""``hydra/sweeper=grid`` (the default): Hydra's basic sweeper, with every trial in an Optuna study.

Same expansion as Hydra's basic sweeper (the product of every comma list / choice / range, in
command-line order), so ``python -m src.train -m lora.r=8,16,32`` means what it always meant. Each job
is also an Optuna trial, so grids and searches are analysed the same way. Running the same command
again completes the grid: cells already completed in the study are skipped (set
``hydra.sweeper.rerun_completed=true`` to measure them again).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from typing import Any

import optuna
from optuna.trial import TrialState

from src.sweeper import study as S
from src.sweeper.base import StudySweeper, _Outcome
from src.sweeper.space import SearchSpace

log = logging.getLogger("paretune.sweeper")


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


class GridSweeper(StudySweeper):
    kind = "grid"

    def __init__(self, *, max_batch_size: int | None = None, rerun_completed: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_batch_size = max_batch_size
        self.rerun_completed = bool(rerun_completed)

    def jobs(self, space: SearchSpace) -> list[dict[str, Any]]:
        grid = space.grid()
        return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]

    def jobs_to_check(self, space: SearchSpace) -> list[dict[str, Any]]:
        return self.jobs(space)  # a grid is finite: check every job

    def run(self, study: optuna.Study, space: SearchSpace, leases: S.Leases, outcome: _Outcome) -> None:
        todo = self.jobs(space)
        with self.lock(study):
            S.fail_stale(study)
        if not self.rerun_completed:
            done = Counter(_key(t.params) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            kept = []
            for params in todo:
                if done[_key(params)] > 0:
                    done[_key(params)] -= 1
                else:
                    kept.append(params)
            if len(kept) < len(todo):
                log.info("%d of %d grid cells are already completed in study '%s' and are skipped",
                         len(todo) - len(kept), len(todo), study.study_name)
            todo = kept
        outcome.planned = len(todo)
        # Batches of n_jobs by default: the failure limit is checked after each batch, so with the
        # sequential launcher a sweep stops right after the failure that crosses it, and no trial is
        # asked (and held RUNNING) long before it starts.
        size = self.max_batch_size or self.n_jobs
        for start in range(0, len(todo), size):
            batch = []
            with self.lock(study):
                for params in todo[start:start + size]:
                    # An enqueued trial is popped by the next ask: this pins the trial's parameters.
                    study.enqueue_trial(params, skip_if_exists=False)
                    trial = study.ask(space.distributions)
                    leases.take(trial._trial_id)  # noqa: SLF001
                    batch.append((trial, params))
            self.launch(study, batch, space, leases, outcome)
