"""``hydra/sweeper=optuna``: an Optuna 5 ask/tell search over Hydra jobs.

Its keys are those of Hydra's official Optuna sweeper (``params``, ``direction``, ``n_trials``,
``n_jobs``, ``storage``, ``study_name``, ``max_failure_rate``, ``sampler``), which cannot be used
here: it requires optuna<3 and reads ``range(1,3)`` as 1..3. This one runs on Optuna 5, keeps Hydra's
meaning of every sweep expression, resumes a study, and shares it between processes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.sweeper import study as S
from src.sweeper.base import StudySweeper, _Outcome
from src.sweeper.space import SearchSpace

log = logging.getLogger("paretune.sweeper")

_SINGLE_OBJECTIVE = ("optuna.samplers.CmaEsSampler",)
_GRID_SAMPLERS = ("optuna.samplers.GridSampler", "optuna.samplers.BruteForceSampler")


class OptunaSweeper(StudySweeper):
    kind = "search"

    def __init__(self, *, sampler: DictConfig | None = None, n_trials: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sampler_cfg = sampler
        self.n_trials = int(n_trials)

    def _target(self) -> str:
        return "" if self.sampler_cfg is None else str(self.sampler_cfg.get("_target_", ""))

    def make_sampler(self, space: SearchSpace, n_objectives: int = 1) -> optuna.samplers.BaseSampler | None:
        if self.n_trials < 1:
            raise S.StudyError(f"hydra.sweeper.n_trials: must be >= 1, got {self.n_trials}")
        if not space.distributions:
            raise S.StudyError("hydra.sweeper.params: nothing to search; give at least one sweep, e.g. "
                               "hydra.sweeper.params.lora.r=choice(8,16,32) or lora.r=8,16,32 on the command line")
        if self.sampler_cfg is None:
            return None
        cfg = OmegaConf.to_container(self.sampler_cfg, resolve=True)
        assert isinstance(cfg, dict)
        if cfg.get("_target_") in _SINGLE_OBJECTIVE and n_objectives > 1:
            raise S.StudyError(f"hydra.sweeper.sampler: {cfg['_target_'].rsplit('.', 1)[-1]} optimises one objective,"
                               f" and {n_objectives} are declared; choose hydra/sweeper/sampler=tpe, nsgaii, "
                               "nsgaiii, gp or random, or declare one objective")
        if cfg.get("_target_") == "optuna.samplers.GridSampler" and cfg.get("search_space") is None:
            cfg["search_space"] = space.grid()
        try:
            return instantiate(cfg)
        except Exception as exc:  # noqa: BLE001 - a sampler's own message, with the key to fix
            raise S.StudyError(f"hydra.sweeper.sampler: cannot create {cfg.get('_target_')}: {exc}") from exc

    def _limit(self, space: SearchSpace) -> int:
        """n_trials, capped at the grid size for exhaustive samplers (they stop once every point is done)."""
        if self._target() not in _GRID_SAMPLERS:
            return self.n_trials
        size = math.prod(len(v) for v in space.grid().values())
        if size < self.n_trials:
            log.info("the grid has %d points: running at most %d trials", size, size)
        return min(self.n_trials, size)

    def run(self, study: optuna.Study, space: SearchSpace, leases: S.Leases, outcome: _Outcome) -> None:
        limit = self._limit(space)
        outcome.planned = max(0, limit - S.counted(study.get_trials(deepcopy=False)))
        while True:
            batch = []
            with self.lock(study):
                S.fail_stale(study)
                if self.retry_stale:
                    S.retry_stale(study)
                room = limit - S.counted(study.get_trials(deepcopy=False))
                for _ in range(min(self.n_jobs, room)):
                    trial = study.ask(self.distributions)
                    leases.take(trial._trial_id)  # noqa: SLF001
                    batch.append((trial, dict(trial.params)))
            if not batch:
                log.info("study '%s' has its %d trials", study.study_name, limit)
                return
            self.launch(study, batch, space, leases, outcome)
