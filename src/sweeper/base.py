"""What both of our sweepers share: one Optuna study per sweep, jobs run through Hydra's launcher.

A sweeper here asks the study for trials (under a lock, so several processes never overshoot
n_trials), launches each as a Hydra job whose directory is named after the Optuna trial number,
reads the job's result.json and tells the study: values for a completed trial, FAIL with the reason
for anything else. The study alone is then enough for analysis: each trial carries its result.json
path, status, metrics and overrides as user attrs.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from src import overrides, results
from src.redact import remember, scrub, scrub_text
from src.sweeper import report
from src.sweeper import study as S
from src.sweeper.space import SearchSpace, build

log = logging.getLogger("paretune.sweeper")

class StudySweeper(Sweeper):
    """Shared machinery; subclasses decide which parameters the next trials get."""

    kind = "study"

    def __init__(self, *, storage: str, study_name: str | None = None, direction: Any = None,
                 n_jobs: int = 1, max_failure_rate: float = 0.0, params: dict[str, Any] | None = None,
                 retry_stale: bool = False, lease_s: float = 120.0, preflight: str | None = None) -> None:
        super().__init__()
        self.storage_spec = str(storage)
        remember(self.storage_spec)  # a URL set in a config file, not on the command line
        self.study_name = study_name
        self.direction = direction
        self.n_jobs = int(n_jobs)
        self.max_failure_rate = float(max_failure_rate)
        self.params = dict(params or {})
        self.retry_stale = bool(retry_stale)
        self.lease_s = float(lease_s)
        self.preflight = preflight
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None
        self.storage: optuna.storages.BaseStorage | None = None  # as opened: the lock needs its type
        self.distributions: dict[str, Any] = {}
        self._job_idx = 0

    # ---- Hydra's Sweeper interface ------------------------------------------------------------
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None
        if self.n_jobs < 1:
            raise S.StudyError(f"hydra.sweeper.n_jobs: must be >= 1, got {self.n_jobs}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise S.StudyError(f"hydra.sweeper.max_failure_rate: must be in [0, 1], got {self.max_failure_rate}")
        names, directions = self.objectives()
        overrides_in = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        parsed = overrides.parse(overrides_in, self.hydra_context.config_loader)
        space = build(parsed)
        name = self.study_name or S.default_study_name(self.kind, sorted(overrides_in), names, directions)
        self.check_jobs(self.jobs_to_check(space), space)

        self.storage = storage = S.open_storage(self.storage_spec)
        sampler = self.make_sampler(space, len(directions))
        try:  # load first: creating an existing study would still append to a journal before it fails
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        except KeyError:
            study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler,
                                        load_if_exists=True)
        self.distributions = self.trial_distributions(space, study)
        S.check_resumed(study, names, directions, self.distributions)
        if study.metric_names is None:
            with warnings.catch_warnings():  # experimental in Optuna 5, and exactly what the dashboard shows
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(names)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._save_sweep_config(sweep_dir, name)
        log.info("study '%s' in %s (%d trials so far); sweep dir %s", name, S.mask_url(self.storage_spec),
                 len(study.trials), sweep_dir)

        leases = S.Leases(storage, self.lease_s)
        outcome = _Outcome()
        try:
            self.run(study, space, leases, outcome)
        finally:
            # Also when the sweep stops early: what the study holds so far is summarised.
            leases.stop()
            try:
                report.write_results(sweep_dir / report.RESULTS_FILE, study, names)
            except Exception as exc:  # noqa: BLE001 - must not hide the error that stopped the sweep
                log.warning("could not write %s: %s", report.RESULTS_FILE, exc)
        report.wandb_summary(study, names, sweep_dir, self.config.get("logger"))
        return outcome.returns

    # ---- for subclasses -----------------------------------------------------------------------
    def make_sampler(self, space: SearchSpace, n_objectives: int) -> optuna.samplers.BaseSampler | None:
        return None

    def jobs_to_check(self, space: SearchSpace) -> list[dict[str, Any]]:
        return space.extremes()

    def trial_distributions(self, space: SearchSpace, study: optuna.Study) -> dict[str, Any]:
        """The distributions trials are asked with (a grid widens them so a study can grow)."""
        return dict(space.distributions)

    def run(self, study: optuna.Study, space: SearchSpace, leases: S.Leases, outcome: _Outcome) -> None:
        raise NotImplementedError

    # ---- shared steps -------------------------------------------------------------------------
    def lock(self, study: optuna.Study) -> Any:
        """The study-wide lock under which this process counts trials and asks for new ones."""
        assert self.storage is not None
        return S.study_lock(self.storage, self.storage_spec, study.study_name)

    def objectives(self) -> tuple[list[str], list[Any]]:
        """Names and directions declared once in the task config; ``direction`` may only agree."""
        assert self.config is not None
        declared = list(self.config.get("objectives") or [])
        names = [str(o.name) for o in declared]
        directions = [str(o.direction).lower().split(".")[-1] for o in declared]
        if not names:
            raise S.StudyError("objectives: declare at least one (name + direction) in conf/train.yaml")
        if self.direction is not None:
            given = [self.direction] if isinstance(self.direction, str) else list(self.direction)
            given = [str(d).lower() for d in given]
            if given != directions:
                raise S.StudyError(f"hydra.sweeper.direction: {given} disagrees with the declared objectives "
                                   f"{dict(zip(names, directions, strict=True))}; remove it or change `objectives`")
        return names, directions

    def check_jobs(self, jobs: list[dict[str, Any]], space: SearchSpace) -> None:
        """Compose and validate every given parameter set before the first trial runs."""
        assert self.hydra_context is not None and self.config is not None
        check = get_method(self.preflight) if self.preflight else None
        problems = []
        for params in jobs:
            overrides = space.overrides(params)
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
                if check is not None:
                    check(cfg)
            except Exception as exc:  # noqa: BLE001 - reported together, below
                problems.append(f"[{' '.join(overrides) or 'defaults'}]\n    {exc}")
        if problems:
            unique = list(dict.fromkeys(problems))
            raise S.StudyError(f"{len(unique)} parameter set(s) of this sweep are invalid; nothing was run:\n  "
                               + "\n  ".join(unique))

    def launch(self, study: optuna.Study, batch: Sequence[tuple[optuna.Trial, dict[str, Any]]],
               space: SearchSpace, leases: S.Leases, outcome: _Outcome) -> None:
        """Run one batch of asked trials as Hydra jobs and tell the study each outcome."""
        assert self.config is not None
        keys = list(space.distributions)
        job_overrides = [space.overrides(params) + [f"study.name={study.study_name}", f"study.trial={t.number}",
                                                    f"study.params=[{','.join(keys)}]"]
                         for t, params in batch]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        try:
            returns = self.launcher.launch(job_overrides, initial_job_idx=self._job_idx)
        except BaseException as exc:
            # Ctrl-C or a launcher crash: a job that finished keeps its result, the others fail as
            # stale, so `retry_stale` can run them again.
            why = "interrupted (SIGINT)" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            for (t, _), ovr in zip(batch, job_overrides, strict=True):
                path = sweep_dir / str(t.number) / results.RESULT_FILE
                record, _ = results.load(path)
                if record is not None and _record_values(record, study.metric_names or [])[0] is not None:
                    self._tell(study, t, path, None, ovr, outcome)
                else:
                    S.fail_trial(study, t._trial_id, f"the sweep stopped: {why}", stale=True)  # noqa: SLF001
                leases.release(t._trial_id)  # noqa: SLF001
            raise
        self._job_idx += len(batch)
        for (trial, _), ret, ovr in zip(batch, returns, job_overrides, strict=True):
            out_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg else sweep_dir / str(trial.number)
            failure = None
            if ret.status == JobStatus.FAILED:
                error = ret._return_value  # noqa: SLF001 - reading .return_value would re-raise it
                failure = scrub_text(f"{type(error).__name__}: {error}".strip())
            self._tell(study, trial, out_dir / results.RESULT_FILE, failure, ovr, outcome)
            leases.release(trial._trial_id)  # noqa: SLF001
        outcome.returns.append(returns)
        outcome.check(self.max_failure_rate)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, path: Path, failure: str | None,
              overrides: list[str], outcome: _Outcome) -> None:
        """Tell the study what the trial's result.json says (or why there is none)."""
        names = study.metric_names or []
        record, why = (None, failure) if failure else results.load(path)
        values, reason = (None, failure or f"no readable {path.name} ({why})") if record is None else \
            _record_values(record, names)
        try:
            trial.set_user_attr(S.RESULT_PATH, str(path.resolve()))
            trial.set_user_attr(S.OVERRIDES, scrub([o for o in overrides if not o.startswith("study.")]))
            if values is not None:
                assert record is not None
                # all of them: a few dozen numbers, and analysis then needs nothing but the study
                trial.set_user_attr(S.METRICS, {**record.get("metrics", {}), **record.get("gains", {})})
                trial.set_user_attr(S.STATUS, "completed")
                tell(study, trial, values)
                outcome.completed += 1
            else:
                trial.set_user_attr(S.STATUS, "failed")
                trial.set_user_attr(S.ERROR, scrub_text(reason or ""))
                tell(study, trial, state=optuna.trial.TrialState.FAIL)
                outcome.failed.append((trial.number, reason or ""))
                log.error("trial %d failed: %s", trial.number, reason)
        except (S.UpdateFinishedTrialError, ValueError, RuntimeError) as exc:
            # Another process failed this trial as stale (our lease lapsed): its record stays on disk.
            log.warning("trial %d could not be told to the study (%s); its record is %s", trial.number, exc, path)

    def _save_sweep_config(self, sweep_dir: Path, study_name: str) -> None:
        assert self.config is not None
        cfg = OmegaConf.to_container(self.config, resolve=False)
        assert isinstance(cfg, dict)
        cfg["hydra"]["sweeper"]["storage"] = S.mask_url(self.storage_spec)
        for i, o in enumerate(cfg["hydra"]["overrides"].get("hydra", [])):
            if str(o).startswith("hydra.sweeper.storage="):
                cfg["hydra"]["overrides"]["hydra"][i] = f"hydra.sweeper.storage={S.mask_url(self.storage_spec)}"
        cfg["study_name"] = study_name
        # Every override (paths.study_storage=postgresql://... among them) with its password masked.
        (sweep_dir / "multirun.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(scrub(cfg))))


def tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None = None,
         state: optuna.trial.TrialState | None = None) -> None:
    """study.tell, minus one quirk: exhaustive samplers (grid, brute force) call ``study.stop()`` once
    every point is taken, which raises outside ``study.optimize``. The trial is stored before that
    (Optuna stores it in a ``finally``), and our loops stop on their own count, so it is dropped here."""
    try:
        study.tell(trial, values, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


class _Outcome:
    """What this process ran: returns for Hydra, and the failures the sweep may still afford.

    The limit applies to the trials this run plans (``planned``): the sweep stops as soon as more
    than ``max_failure_rate`` of them have failed, i.e. once the rate over the whole run is sure to
    pass it. A first failure therefore does not end a 20-trial search at a 50 % limit, and a 0 %
    limit stops at the first failure.
    """

    def __init__(self) -> None:
        self.returns: list[Sequence[JobReturn]] = []
        self.completed = 0
        self.failed: list[tuple[int, str]] = []
        self.planned = 0

    def check(self, max_rate: float) -> None:
        if not self.failed or len(self.failed) <= max_rate * max(self.planned, 1):
            return
        done = self.completed + len(self.failed)
        listed = "\n  ".join(f"trial {n}: {why}" for n, why in self.failed[-10:])
        raise S.StudyError(f"{len(self.failed)} of the {self.planned} trials this run planned failed (after {done}), "
                           f"more than hydra.sweeper.max_failure_rate={max_rate:.0%} of them; the sweep stops. "
                           f"Completed trials are kept in the study; start the same command to resume.\n  {listed}")


def _record_values(record: dict[str, Any], names: list[str]) -> tuple[list[float] | None, str | None]:
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
