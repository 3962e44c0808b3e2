"""``hydra/sweeper=grid`` (the default): Hydra's basic sweeper, with every trial in an Optuna study.

Same expansion as Hydra's basic sweeper (the product of every comma list / choice / range, in
command-line order), so ``python -m src.train -m lora.r=8,16,32`` means what it always meant. Each job
is also an Optuna trial, so grids and searches are analysed the same way. Running the same command
again completes the grid: cells already completed in the study are skipped (set
``hydra.sweeper.rerun_completed=true`` to measure them again).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
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
        return space.jobs()

    def jobs_to_check(self, space: SearchSpace) -> list[dict[str, Any]]:
        return self.jobs(space)  # a grid is finite: check every job

    def corners_to_check(self, space: SearchSpace) -> list[dict[str, Any]]:
        return []  # every job already had the full preflight

    def trial_distributions(self, space: SearchSpace, study: optuna.Study) -> dict[str, BaseDistribution]:
        """How each grid key is stored in the study, chosen so that a named study can grow.

        Optuna refuses a categorical whose choices change within a study ("dynamic value space"), but
        not a numeric range that does. A grid never samples (its values are enqueued), so a key whose
        values are all integers (or all floats) is stored as a range over them, and ``lora.r=2,4`` can
        later become ``lora.r=2,4,8`` in the same study. Other keys stay categorical; when the study
        already holds a key, its recorded distribution is kept if it covers this grid's values.
        """
        seen = S.recorded_distributions(study)
        out: dict[str, BaseDistribution] = {}
        for key, values in space.grid().items():
            old = seen.get(key)
            if isinstance(old, CategoricalDistribution) and all(v in old.choices for v in values):
                out[key] = old
            elif values and all(type(v) is int for v in values):
                ints = [int(v) for v in values if isinstance(v, int)]
                out[key] = IntDistribution(min(ints), max(ints))
            elif values and all(type(v) is float for v in values):
                floats = [float(v) for v in values if isinstance(v, float)]
                out[key] = FloatDistribution(min(floats), max(floats))
            else:
                out[key] = space.distributions[key]
        return out

    def run(self, study: optuna.Study, space: SearchSpace, leases: S.Leases, outcome: _Outcome) -> None:
        todo = self.jobs(space)
        with self.lock(study):
            S.fail_stale(study, grace_s=self.lease_s)
        if not self.rerun_completed:
            # a pruned cell was decided by the study's pruner: resuming does not run it again either
            done = Counter(_key(t.params) for t in study.get_trials(deepcopy=False,
                                                                    states=(TrialState.COMPLETE, TrialState.PRUNED)))
            kept = []
            for params in todo:
                if done[_key(params)] > 0:
                    done[_key(params)] -= 1
                else:
                    kept.append(params)
            if len(kept) < len(todo):
                log.info("%d of %d grid cells are already completed (or pruned) in study '%s' and are skipped",
                         len(todo) - len(kept), len(todo), study.study_name)
            todo = kept
        outcome.planned = len(todo)
        # Batches of n_jobs by default: the failure limit is checked after each batch, so with the
        # sequential launcher a sweep stops right after the failure that crosses it, and no trial is
        # asked (and held RUNNING) long before it starts.
        size = self.max_batch_size or self.n_jobs
        keys = list(space.distributions)
        for start in range(0, len(todo), size):
            batch = []
            with self.lock(study):
                for params in todo[start:start + size]:
                    # An enqueued trial is popped by the next ask: this pins the trial's parameters.
                    study.enqueue_trial(params, skip_if_exists=False)
                    trial = study.ask(self.distributions)
                    if not leases.take(trial._trial_id):  # noqa: SLF001
                        log.warning("trial %d (%s) was failed by another worker before it started; "
                                    "it is not run in this sweep", trial.number, space.overrides(params))
                        continue
                    batch.append((trial, space.overrides(params) + self.trial_overrides(study, trial, keys)))
            self.launch(study, batch, leases, outcome)
