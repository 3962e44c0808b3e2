"""What both of our sweepers share: one Optuna study per sweep, jobs run through Hydra's launcher.

A sweeper here asks the study for trials (under a lock, so several processes never overshoot
n_trials), launches each as a Hydra job, reads the job's outcome and tells the study: values for a
completed trial, FAIL with the reason for anything else.

Any Hydra app can use them with the keys of Hydra's official Optuna sweeper: the task function's
return value is the objective, ``direction`` names it, ``storage: null`` is an in-memory study.
What paretune adds is a set of optional hooks its own config sets
(conf/hydra/sweeper/hooks/paretune.yaml): declared objectives, a preflight of every job's config, a
reader of each trial's result.json (so the study alone is enough for analysis: each trial carries its
record path, status, metrics and overrides as user attrs), the ``study.*`` job keys, and a W&B
summary run.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from src import overrides
from src.redact import remember, scrub, scrub_text
from src.sweeper import jobs, pruning, report, scheduler
from src.sweeper import study as S
from src.sweeper.jobs import JobOutcome
from src.sweeper.space import SearchSpace, build

log = logging.getLogger("paretune.sweeper")
# The most combinations of a search space's choices and range ends the ``corner_check`` hook is run on
# before the start: composing one config takes 30-100 ms on 2 cores, so up to about 50 s.
MAX_CORNERS = 512
MAX_LISTED = 20  # refused combinations named in the error (the count says how many there are)


class StudySweeper(Sweeper):
    """Shared machinery; subclasses decide which parameters the next trials get."""

    kind = "study"

    def __init__(self, *, storage: str | None = None, study_name: str | None = None, direction: Any = None,
                 n_jobs: int = 1, max_failure_rate: float = 0.0, failure_scope: str = "batch",
                 params: dict[str, Any] | None = None, retry_stale: bool = False, lease_s: float = 120.0,
                 objectives: Any = None, preflight: str | None = None, corner_check: str | None = None,
                 record: str | None = None, job_resources: str | None = None,
                 trial_keys: str | None = None, summary: str | None = None, seed_key: str | None = None,
                 pruner: Any = None, prune_on: str | None = None, signal_direction: str | None = None) -> None:
        super().__init__()
        # null: an in-memory study, as in Hydra's Optuna sweeper (gone when the sweep ends)
        self.storage_spec = None if storage is None else str(storage)
        if self.storage_spec:
            remember(self.storage_spec)  # a URL set in a config file, not on the command line
        self.study_name = study_name
        self.direction = direction
        self.n_jobs = int(n_jobs)
        self.max_failure_rate = float(max_failure_rate)
        self.failure_scope = str(failure_scope)
        self.params = dict(params or {})
        self.retry_stale = bool(retry_stale)
        self.lease_s = float(lease_s)
        # Hooks: what an app adds to plain Optuna behaviour (paretune's: conf/hydra/sweeper/hooks/paretune.yaml).
        self.declared = objectives
        self.preflight = preflight
        self.corner_check = corner_check
        self.job_resources = job_resources
        self.record = record
        self.trial_keys = trial_keys
        self.summary = summary
        self.seed_key = seed_key  # the task's seed (hydra/sweeper=optuna: on_repeat=new_seed runs the next one)
        # Pruning (src/sweeper/pruning.py): the pruner's config, the objective its signal stands for, and
        # which way the signal improves (null: as that objective).
        self.pruner_cfg = pruner
        self.prune_on = prune_on
        self.signal_direction = signal_direction
        self.pruning: dict[str, Any] | None = None  # what each job is told, once the study is known
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None
        self.storage: optuna.storages.BaseStorage | None = None  # as opened: the lock needs its type
        self.distributions: dict[str, Any] = {}
        self.names: list[str] = []
        self._job_idx = 0

    # ---- Hydra's Sweeper interface ------------------------------------------------------------
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        if scheduler.is_submitit(self.launcher):  # jobs on SLURM (or submitit's local queue): src/sweeper/scheduler.py
            self.launcher = scheduler.SchedulerLauncher(
                self.launcher, self.resources_of if self.job_resources else None)

    def resources_of(self, job_overrides: Sequence[str]) -> dict[str, Any]:
        """What the ``job_resources`` hook asks the scheduler for, for one job (its own composed config)."""
        assert self.hydra_context is not None and self.config is not None and self.job_resources
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(job_overrides))
        return dict(get_method(self.job_resources)(cfg) or {})

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None
        if self.n_jobs < 1:
            raise S.StudyError(f"hydra.sweeper.n_jobs: must be >= 1, got {self.n_jobs}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise S.StudyError(f"hydra.sweeper.max_failure_rate: must be in [0, 1], got {self.max_failure_rate}")
        if self.failure_scope not in FAILURE_SCOPES:
            raise S.StudyError(f"hydra.sweeper.failure_scope: must be one of {list(FAILURE_SCOPES)}, "
                               f"got {self.failure_scope!r}")
        self.check_settings()
        if isinstance(self.launcher, scheduler.SchedulerLauncher):
            self.launcher.check()
        names, directions = self.objectives()
        self.names = names
        overrides_in = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        parsed = overrides.parse(overrides_in, self.hydra_context.config_loader)
        space = build(parsed)
        name = self.study_name or S.default_study_name(self.kind, sorted(overrides_in), names, directions)
        self.check_jobs(self.jobs_to_check(space), space)
        self.check_corners(space)
        self.pruning = self.pruning_settings(names, directions)  # refused here, before a study is created

        self.storage = storage = S.open_storage(self.storage_spec)
        sampler = self.make_sampler(space, len(directions))
        try:  # load first: creating an existing study would still append to a journal before it fails
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        except KeyError:
            study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler,
                                        load_if_exists=True)
        if self.pruning is not None and self.storage_spec is None:
            pruning.remember_memory(name, storage)
        self.distributions = self.trial_distributions(space, study)
        S.check_resumed(study, names if self.declared else None, directions, self.distributions)
        if self.declared and study.metric_names is None:
            with warnings.catch_warnings():  # experimental in Optuna 5, and exactly what the dashboard shows
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(names)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._save_sweep_config(sweep_dir, name)
        log.info("study '%s' in %s (%d trials so far); sweep dir %s", name, S.describe_storage(self.storage_spec),
                 len(study.trials), sweep_dir)

        leases = S.Leases(storage, self.lease_s)
        outcome = _Outcome(self.max_failure_rate, self.failure_scope)
        try:
            self.run(study, space, leases, outcome)
        finally:
            # Also when the sweep stops early: what the study holds so far is summarised.
            leases.stop()
            try:
                report.write_results(sweep_dir / report.RESULTS_FILE, study, names if self.declared else None)
            except Exception as exc:  # noqa: BLE001 - must not hide the error that stopped the sweep
                log.warning("could not write %s: %s", report.RESULTS_FILE, exc)
        if self.summary:
            get_method(self.summary)(study, names, sweep_dir, self.config)
        return outcome.returns

    # ---- for subclasses -----------------------------------------------------------------------
    def check_settings(self) -> None:
        """Refuse a subclass's own bad keys before the study is opened or created."""
    def make_sampler(self, space: SearchSpace, n_objectives: int) -> optuna.samplers.BaseSampler | None:
        return None

    def jobs_to_check(self, space: SearchSpace) -> list[dict[str, Any]]:
        return space.extremes()

    def corners_to_check(self, space: SearchSpace) -> list[dict[str, Any]]:
        """The parameter sets the cheaper ``corner_check`` hook sees (none when ``jobs_to_check`` is all)."""
        count = space.corner_count()
        if count > MAX_CORNERS:
            log.warning("the search space has %d combinations of its choices and range ends, more than the %d "
                        "checked before the start (hydra.sweeper.corner_check): its extremes were checked, and "
                        "each trial's own checks still refuse it before any work", count, MAX_CORNERS)
            return []
        return space.corners()

    def trial_distributions(self, space: SearchSpace, study: optuna.Study) -> dict[str, Any]:
        """The distributions trials are asked with (a grid widens them so a study can grow)."""
        return dict(space.distributions)

    def run(self, study: optuna.Study, space: SearchSpace, leases: S.Leases, outcome: _Outcome) -> None:
        raise NotImplementedError

    # ---- shared steps -------------------------------------------------------------------------
    def lock(self, study: optuna.Study) -> Any:
        """The study-wide lock under which this process counts trials and asks for new ones."""
        assert self.storage is not None
        if self.storage_spec is None:  # an in-memory study lives in this process alone
            return contextlib.nullcontext()
        return S.study_lock(self.storage, self.storage_spec, study.study_name)

    def objectives(self) -> tuple[list[str], list[Any]]:
        """Names and directions: the app's declaration (hook ``objectives``) when it has one, and then
        ``direction`` may only agree; else ``direction`` alone, as in Hydra's Optuna sweeper."""
        given = None
        if self.direction is not None:
            raw = [self.direction] if isinstance(self.direction, str) else list(self.direction)
            given = [str(d).lower().split(".")[-1] for d in raw]  # "Direction.minimize" from the official enum
            bad = [d for d in given if d not in ("minimize", "maximize")]
            if bad or not given:
                raise S.StudyError(f"hydra.sweeper.direction: {bad or given} is not minimize or maximize; give one "
                                   "of them, or a list with one per value the task function returns")
        if not self.declared:
            if given is None:
                raise S.StudyError("hydra.sweeper.direction: give minimize or maximize (or a list, one per value "
                                   "the task function returns)")
            return (["value"] if len(given) == 1 else [f"values_{i}" for i in range(len(given))]), given
        declared = list(self.declared)
        names = [str(o["name"]) for o in declared]
        directions = [str(o["direction"]).lower().split(".")[-1] for o in declared]
        if not names:
            raise S.StudyError("hydra.sweeper.objectives: declare at least one (name + direction)")
        if given is not None and given != directions:
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

    def check_corners(self, space: SearchSpace) -> None:
        """Run the ``corner_check`` hook on every combination of the space's choices and range ends, and
        refuse the sweep listing those it refuses. Unlike ``preflight`` on the extremes, a combination
        whose config does not compose is skipped: the extremes already showed every value composes, and a
        pair a search allows by design (e.g. an option only one method reads) fails its own trial."""
        assert self.hydra_context is not None and self.config is not None
        if not self.corner_check:
            return
        check = get_method(self.corner_check)
        problems, skipped = [], 0
        for params in self.corners_to_check(space):
            overrides = space.overrides(params)
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            except Exception:  # noqa: BLE001 - see the docstring
                skipped += 1
                continue
            try:
                check(cfg)
            except Exception as exc:  # noqa: BLE001 - reported together, below
                problems.append(f"[{' '.join(overrides)}]\n    {exc}")
        if skipped:
            log.info("%d combination(s) of the search space do not compose; the corner check skipped them", skipped)
        if problems:
            shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                             if len(problems) > MAX_LISTED else [])
            raise S.StudyError(f"{len(problems)} combination(s) of this search's choices and range ends are "
                               "refused; nothing was run (narrow the space to leave them out):\n  "
                               + "\n  ".join(shown))

    def pruning_settings(self, names: list[str], directions: list[str]) -> dict[str, Any] | None:
        """What a job needs to report to its trial and ask the pruner (None: this sweep does not prune);
        a bad pruner, ``prune_on`` or ``signal_direction`` is refused here, before any job runs."""
        cfg: Any = (OmegaConf.to_container(self.pruner_cfg, resolve=True) if isinstance(self.pruner_cfg, DictConfig)
                    else self.pruner_cfg)
        if not cfg or cfg.get("_target_") == "optuna.pruners.NopPruner":
            return None
        try:
            instantiate(cfg)
        except Exception as exc:  # noqa: BLE001 - Optuna's own message, with the key to fix
            raise S.StudyError(f"hydra.sweeper.pruner: cannot create {cfg.get('_target_')}: {exc}") from exc
        on = names[0] if self.prune_on is None else str(self.prune_on)
        if on not in names:
            raise S.StudyError(f"hydra.sweeper.prune_on: {on!r} is not an objective of this study {names}; "
                               "name one of them (null: the first)")
        if self.signal_direction not in (None, "minimize", "maximize"):
            raise S.StudyError(f"hydra.sweeper.signal_direction: {self.signal_direction!r}; give minimize, maximize "
                               "or null (the signal improves as its objective does)")
        direction = directions[names.index(on)]
        return {"objective": on, "direction": direction, "sign": pruning.oriented(direction, self.signal_direction)}

    def trial_overrides(self, study: optuna.Study, trial: optuna.Trial, keys: list[str]) -> list[str]:
        """The keys that tell a job which study and trial it is (hook ``trial_keys``: the config node),
        and, when the sweep prunes, how to report to its trial (an environment variable, pruning.ENV)."""
        out = []
        if self.pruning is not None:
            out.append(pruning.env_override(study.study_name, trial.number, self.pruning["direction"],
                                            self.pruning["sign"]))
        if self.trial_keys:
            node = self.trial_keys
            out += [f"{node}.name={study.study_name}", f"{node}.trial={trial.number}",
                    f"{node}.params=[{','.join(keys)}]"]
        return out

    def read(self, out_dir: Path, ret: JobReturn | None) -> JobOutcome:
        """A job's outcome: by the app's reader (hook ``record``), else from the task's return value."""
        reader = get_method(self.record) if self.record else jobs.from_return
        return reader(out_dir, ret, self.names)

    def launch(self, study: optuna.Study, batch: Sequence[tuple[optuna.Trial, list[str]]],
               leases: S.Leases, outcome: _Outcome) -> None:
        """Run one batch of asked trials (each with its job overrides) as Hydra jobs; tell the study each outcome."""
        assert self.config is not None
        job_overrides = [ovr for _, ovr in batch]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        try:
            returns = self.launcher.launch(job_overrides, initial_job_idx=self._job_idx)
        except BaseException as exc:
            # Ctrl-C or a launcher crash: a job that finished keeps its record (when the app writes one,
            # in the job folder named by its trial number), the others fail as stale, so `retry_stale`
            # can run them again.
            why = "interrupted (SIGINT)" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            for t, ovr in batch:
                job = self.read(sweep_dir / str(t.number), None) if self.record else None
                if job is not None and (job.values is not None or job.pruned):
                    self._tell(study, t, job, ovr, outcome)
                else:
                    S.fail_trial(study, t._trial_id, f"the sweep stopped: {why}", stale=True)  # noqa: SLF001
                leases.release(t._trial_id)  # noqa: SLF001
            raise
        self._job_idx += len(batch)
        failed_before = len(outcome.failed)
        for (trial, ovr), ret in zip(batch, returns, strict=True):
            out_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg else sweep_dir / str(trial.number)
            self._tell(study, trial, self.read(out_dir, ret), ovr, outcome)
            leases.release(trial._trial_id)  # noqa: SLF001
        outcome.returns.append(returns)
        outcome.check(len(batch), len(outcome.failed) - failed_before)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, job: JobOutcome, overrides: list[str],
              outcome: _Outcome) -> None:
        """Tell the study a job's outcome, with its overrides and the app's attrs on the trial."""
        node = f"{self.trial_keys}." if self.trial_keys else None
        try:
            for key, value in job.attrs.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr(S.OVERRIDES, scrub([o for o in overrides if not (node and o.startswith(node))
                                                    and not o.startswith(pruning.ENV_OVERRIDE)]))
            if job.pruned:
                trial.set_user_attr(S.STATUS, "pruned")
                tell(study, trial, state=optuna.trial.TrialState.PRUNED)
                outcome.pruned += 1
                log.info("trial %d pruned: %s", trial.number, job.error)
            elif job.values is not None:
                trial.set_user_attr(S.STATUS, "completed")
                tell(study, trial, job.values)
                outcome.completed += 1
            else:
                reason = scrub_text(job.error or "failed")
                trial.set_user_attr(S.STATUS, "failed")
                trial.set_user_attr(S.ERROR, reason)
                tell(study, trial, state=optuna.trial.TrialState.FAIL)
                outcome.failed.append((trial.number, reason))
                log.error("trial %d failed: %s", trial.number, reason)
        except (S.UpdateFinishedTrialError, ValueError, RuntimeError) as exc:
            # Another process failed this trial as stale (our lease lapsed): its record stays on disk.
            log.warning("trial %d could not be told to the study (%s)", trial.number, exc)

    def _save_sweep_config(self, sweep_dir: Path, study_name: str) -> None:
        assert self.config is not None
        cfg = OmegaConf.to_container(self.config, resolve=False)
        assert isinstance(cfg, dict)
        cfg["hydra"]["sweeper"]["storage"] = self.storage_spec and S.mask_url(self.storage_spec)
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


FAILURE_SCOPES = ("batch", "run")


class _Outcome:
    """What this process ran: returns for Hydra, and the failures the sweep may still afford.

    ``failure_scope=batch`` (Hydra's Optuna sweeper's rule): the sweep stops after a batch of
    ``n_jobs`` trials in which more than ``max_failure_rate`` of the jobs failed; with one job per
    batch, any failure stops it unless the rate is 1. ``run`` (paretune's): the limit applies to the
    trials this run plans (``planned``), and the sweep stops as soon as more than that fraction of
    them have failed, i.e. once the rate over the whole run is sure to pass it; a first failure then
    does not end a 20-trial search at a 50 % limit. A 0 % limit stops at the first failure either way.
    """

    def __init__(self, max_rate: float, scope: str) -> None:
        self.max_rate, self.scope = max_rate, scope
        self.returns: list[Sequence[JobReturn]] = []
        self.completed = 0
        self.pruned = 0
        self.failed: list[tuple[int, str]] = []
        self.planned = 0

    def check(self, batch_size: int, batch_failed: int) -> None:
        if self.scope == "batch":
            if batch_failed == 0 or batch_failed / batch_size <= self.max_rate:  # the official plugin's test
                return
            head = (f"{batch_failed} of the {batch_size} trials of the last batch failed, more than "
                    f"hydra.sweeper.max_failure_rate={self.max_rate:.0%} of them; the sweep stops.")
        else:
            if not self.failed or len(self.failed) <= self.max_rate * max(self.planned, 1):
                return
            done = self.completed + len(self.failed)
            head = (f"{len(self.failed)} of the {self.planned} trials this run planned failed (after {done}), "
                    f"more than hydra.sweeper.max_failure_rate={self.max_rate:.0%} of them; the sweep stops.")
        listed = "\n  ".join(f"trial {n}: {why}" for n, why in self.failed[-10:])
        raise S.StudyError(f"{head} Completed trials are kept in the study; start the same command to resume."
                           f"\n  {listed}")
