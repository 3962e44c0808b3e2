"""``hydra/sweeper=optuna``: an Optuna 5 ask/tell search over Hydra jobs.

Its keys are those of Hydra's official Optuna sweeper (``params``, ``direction``, ``n_trials``,
``n_jobs``, ``storage``, ``study_name``, ``max_failure_rate``, ``sampler``, ``custom_search_space``),
which cannot be used here: it requires optuna<3 and reads ``range(1,3)`` as 1..3. This one runs on
Optuna 5, keeps Hydra's meaning of every sweep expression, resumes a study, and shares it between
processes.

A sampler may propose parameters the study already completed (TPE re-proposes categorical values).
``on_repeat`` decides what that costs: ``reuse`` tells Optuna the completed trial's values without
running anything; ``new_seed`` runs it as a real repeat with the next unused value of ``seed_key``
(another sample of the same configuration, which narrows its interval).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from src.sweeper import study as S
from src.sweeper.base import StudySweeper, _Outcome, tell
from src.sweeper.space import SearchSpace

log = logging.getLogger("paretune.sweeper")

_SINGLE_OBJECTIVE = ("optuna.samplers.CmaEsSampler",)
_GRID_SAMPLERS = ("optuna.samplers.GridSampler", "optuna.samplers.BruteForceSampler")


class OptunaSweeper(StudySweeper):
    kind = "search"

    def __init__(self, *, sampler: DictConfig | None = None, n_trials: int = 20, custom_search_space: str | None = None,
                 on_repeat: str = "reuse", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sampler_cfg = sampler
        self.n_trials = int(n_trials)
        self.custom_search_space = custom_search_space
        self.on_repeat = str(on_repeat)

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

    def check_settings(self) -> None:
        if self.on_repeat not in REPEATS:
            raise S.StudyError(f"hydra.sweeper.on_repeat: must be one of {list(REPEATS)}, got {self.on_repeat!r}")
        if self.on_repeat == "new_seed" and not self.seed_key:
            raise S.StudyError("hydra.sweeper.on_repeat=new_seed needs hydra.sweeper.seed_key (the config key of "
                               "the task's random seed, e.g. train.seed); or use on_repeat=reuse")

    def run(self, study: optuna.Study, space: SearchSpace, leases: S.Leases, outcome: _Outcome) -> None:
        extend = get_method(self.custom_search_space) if self.custom_search_space else None
        keys = list(space.distributions)
        limit = self._limit(space)
        outcome.planned = max(0, limit - S.counted(study.get_trials(deepcopy=False)))
        while True:
            batch: list[tuple[optuna.Trial, list[str]]] = []
            with self.lock(study):
                S.fail_stale(study, grace_s=self.lease_s)
                if self.retry_stale:
                    S.retry_stale(study)
                room = limit - S.counted(study.get_trials(deepcopy=False))
                asked: list[optuna.Trial] = []
                try:
                    while room > 0 and len(batch) < self.n_jobs:
                        room -= 1
                        trial = study.ask(self.distributions)
                        asked.append(trial)
                        try:
                            if extend is not None:  # the official key: a function(cfg, trial) suggesting more
                                extend(self.config, trial)
                            params = dict(trial.params)
                            ovr = space.overrides(params)
                            if self._repeat(study, trial, params, ovr, outcome):
                                continue
                            taken = leases.take(trial._trial_id)  # noqa: SLF001
                        except UpdateFinishedTrialError:
                            taken = False
                        if not taken:
                            # another worker found it stale while its first writes were held up (a
                            # database restart): it counts as a lost trial (retry_stale runs it again)
                            log.warning("trial %d was failed by another worker before it started",
                                        trial.number)
                            continue
                        batch.append((trial, ovr + self.trial_overrides(study, trial, keys)))
                except BaseException as exc:
                    # nothing asked here may stay RUNNING (it would later count as a lost worker's);
                    # fail_trial leaves a reused repeat, already told, as it is
                    why = f"the sweep stopped before it ran: {type(exc).__name__}: {exc}"
                    for t in asked:
                        S.fail_trial(study, t._trial_id, why)  # noqa: SLF001
                        leases.release(t._trial_id)  # noqa: SLF001
                    raise
            if not batch:  # room is used up (a batch ends early only then), reused repeats included
                log.info("study '%s' has its %d trials", study.study_name, limit)
                return
            self.launch(study, batch, leases, outcome)

    def _repeat(self, study: optuna.Study, trial: optuna.Trial, params: dict[str, Any], ovr: list[str],
                outcome: _Outcome) -> bool:
        """Handle parameters the study already holds. True when the trial was told a completed trial's
        values without a run (``reuse``). Otherwise it runs; when another trial of these parameters
        (completed, or running now in this batch or another worker) has its seed, with the next seed no
        such trial has (added to ``ovr``), so no parameter set runs twice with one seed."""
        seed = self._seed(ovr) if self.seed_key else None
        same = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                if t.number != trial.number and t.params == params]
        done = [t for t in same if t.state == TrialState.COMPLETE and t.user_attrs.get(SEED) == seed]
        if self.on_repeat == "reuse" and done:
            first = done[0]
            for key, value in first.user_attrs.items():
                if key not in (S.OWNER, S.LEASE_UNTIL, S.RETRY_OF):
                    trial.set_user_attr(key, value)
            trial.set_user_attr(REPEAT_OF, first.number)
            tell(study, trial, list(first.values))
            outcome.completed += 1
            log.info("trial %d repeats the parameters of completed trial %d: its values are reused, nothing runs "
                     "(on_repeat=reuse)", trial.number, first.number)
            return True
        used = {t.user_attrs.get(SEED) for t in same}
        if seed is not None and seed in used:
            assert self.seed_key is not None
            new = seed + 1
            while new in used:
                new += 1
            ovr.append(f"{self.seed_key}={new}")
            trial.set_user_attr(REPEAT_OF, min(t.number for t in same if t.user_attrs.get(SEED) == seed))
            log.info("trial %d repeats parameters another trial has with %s=%d: it runs with %s=%d "
                     "(on_repeat=%s)", trial.number, self.seed_key, seed, self.seed_key, new, self.on_repeat)
            seed = new
        if seed is not None:
            trial.set_user_attr(SEED, seed)
        return False

    def _seed(self, ovr: list[str]) -> int | None:
        """The seed a job with these overrides would run with (its composed config's ``seed_key``); None
        when the task has no such key (then only ``reuse`` applies)."""
        assert self.config is not None and self.hydra_context is not None and self.seed_key is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(ovr))
        value = OmegaConf.select(cfg, self.seed_key)
        if value is None and self.on_repeat == "reuse":
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise S.StudyError(f"hydra.sweeper.seed_key: {self.seed_key} is {value!r} in the task config; it must "
                               "name an integer seed (or use on_repeat=reuse)")
        return value


REPEATS = ("reuse", "new_seed")
SEED, REPEAT_OF = S.SEED, S.REPEAT_OF
