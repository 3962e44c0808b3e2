"""``python -m src.train [-m] overrides...``: one trial, or a sweep of them with -m.

A thin Hydra shell: ``main`` names the trial and hands the composed config to ``run_trial``, which
checks it, runs the worker process, reads its result.json and tracks it. ``run_trial`` is plain
Python, importable by tests and by sweepers.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src import adapters, cpu, data, plan, privacy, quant, redact, relay, results, runtime, tracking
from src import overrides as overrides_
from src.config import ConfigError, register_configs, size_problem, to_plain, validate
from src.paths import PROJECT_ROOT
from src.results import TrialResult
from src.sweeper import pruning

log = logging.getLogger("paretune")


def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Commit and dirty flag of the code that runs the trial (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if commit is None else bool(status)}


SUBMITIT_ENV = "SUBMITIT_EXECUTOR"  # set by submitit in its jobs: "slurm" or "local"


class SchedulerStop(Exception):  # noqa: N818 - it is a stop, not an error of the trial
    """The scheduler is ending this trial's job: SIGTERM (scancel, preemption, a node going down) or
    submitit's signal ahead of the time limit. The worker is killed and the trial recorded as failed
    with this message; the sweeper reads the same message from the job (src/sweeper/scheduler.py)."""


@contextlib.contextmanager
def scheduler_signals() -> Iterator[None]:
    """Inside a SLURM job, turn SLURM's stop signals into SchedulerStop while the worker runs. submitit
    logs and ignores SIGTERM, so the trial would go on for SLURM's KillWait and could even finish, and
    its signal before the time limit would leave a record-less trial; this stops it at once, with the
    reason. Once only: a second signal while the stop is recorded is ignored. Before and after the
    worker's run submitit's own handlers apply (the trial's record is being written or stands).
    Outside a submitit job nothing changes."""
    if os.environ.get(SUBMITIT_ENV) != "slurm":
        yield
        return
    from submitit.core.job_environment import JobEnvironment

    job = scheduler_job() or "?"
    ahead = getattr(signal, f"SIG{JobEnvironment.USR_SIG}", signal.SIGUSR2)  # what submitit asks SLURM to send
    reasons = {signal.SIGTERM: f"SLURM job {job} was stopped by SIGTERM (scancel, preemption or its node "
                               "shutting down) while the trial ran; run the same command again to measure it",
               ahead: f"SLURM job {job} reached the end of its time limit (hydra.launcher.timeout_min, "
                               "less signal_delay_s) while the trial ran; raise it and run the same command again"}

    def stop(signum: int, frame: Any) -> None:
        for sig in reasons:  # once: the stop must be recorded, not interrupted by the next signal
            signal.signal(sig, signal.SIG_IGN)
        raise SchedulerStop(reasons[signal.Signals(signum)])

    before = {sig: signal.signal(sig, stop) for sig in reasons}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def scheduler_job() -> str | None:
    """The SLURM job this trial runs in (``<array job>_<task>`` for an array), or None outside SLURM."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def preflight(cfg: DictConfig) -> dict[str, int]:
    """Every check that is cheap, before a worker starts: schema rules, then the data files."""
    try:
        problem = size_problem(cfg.model)
        if problem:
            raise ConfigError(problem)
        for key in cfg.keys():  # every interpolation, also of keys no rule reads (Hydra's own node aside)
            if key != "hydra":
                value = cfg[key]
                if isinstance(value, DictConfig | ListConfig):
                    OmegaConf.to_container(value, resolve=True)
        validate(cfg)
        counts = data.check_files(cfg.data, cfg.eval.num_examples)
        too_big = plan.refusal(cfg)  # after the cheap checks: it reads the model's shape
        if too_big:
            raise ConfigError(too_big)
        return counts
    except OmegaConfBaseException as exc:  # e.g. train.lr='${nope.x}': an interpolation that cannot resolve
        raise _unresolved(exc) from None


def memory_check(cfg: DictConfig) -> None:
    """The memory plan alone (the sweepers' ``corner_check``): a search runs it on every combination of
    its choices and range ends, where ``preflight`` saw only the extremes. A combination the cheap
    checks refuse (an option one method does not take, say) is left to them: it fails its own trial."""
    errors: list[str] = []
    quant.check(cfg.quant, errors)  # without the interpreter probe: ipex's environment was checked once
    if errors or size_problem(cfg.model):
        return
    too_big = plan.refusal(cfg)
    if too_big:
        raise ConfigError(too_big)


def job_resources(cfg: DictConfig) -> dict[str, Any]:
    """What a trial's scheduler job needs (the sweepers' ``job_resources`` hook, hydra/launcher=submitit_*):
    as many CPUs as its worker runs threads (``cpu.threads``, or the pinned ``cpu.cores``) and the
    worker's memory limit. Unset values leave the launcher's own setting (hydra.launcher.cpus_per_task,
    mem_gb), and with threads unset the worker uses the cores the job was given."""
    cores = cpu.parse_cores(cfg.cpu.cores)
    threads = cfg.cpu.threads if cfg.cpu.threads is not None else (len(cores) if cores else None)
    limit = cfg.train.memory_limit_mb
    # the job holds this process too (Hydra, the relay: about 150-250 MB) beside the worker's limit;
    # submitit writes a fraction of a GB as whole MB, so this is exact
    return {"cpus_per_task": None if threads is None else int(threads),
            "mem_gb": None if limit is None else (int(limit) + JOB_PROCESS_MB) / 1024}


JOB_PROCESS_MB = 512


def _unresolved(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "a value"
    return ConfigError(f"{key}: {str(exc).splitlines()[0]}; fix the value or the ${{...}} it refers to")


def _failed_without_record(cfg: dict[str, Any], trial: dict[str, Any], error: dict[str, str],
                           wall_s: float) -> TrialResult:
    trial = {**trial, "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
    environment = trial.pop("environment", {})
    return TrialResult(status="failed", trial=trial, config={k: v for k, v in cfg.items() if k != "trial"},
                       error=error, timings={"worker_wall_s": wall_s}, environment=environment,
                       seed=cfg["train"]["seed"])


def run_trial(cfg: DictConfig, trial_dir: Path, trial: dict[str, Any]) -> TrialResult:
    """Check ``cfg``, run it in a fresh worker process, record and track the outcome.

    Raises ConfigError / DataError for bad input (before any work). Anything that goes wrong
    inside the worker becomes a failed TrialResult instead: a trial's failure never ends a sweep.
    """
    counts = preflight(cfg)
    # When the sweep prunes, the worker reports its signal and this process relays it to the study.
    reporter = pruning.reporter() if trial.get("job_num") is not None else None
    # From here on, parent and worker read the same plain config (enums as their names).
    cfg = OmegaConf.create(to_plain(cfg))
    trial_dir = trial_dir.resolve()
    trial_dir.mkdir(parents=True, exist_ok=True)
    storage = Path(str(cfg.paths.study_storage))
    privacy.apply(bool(cfg.privacy.owner_only), trial_dir,
                  top=trial_dir.parent if trial.get("job_num") is not None else trial_dir,
                  extra=() if "://" in str(cfg.paths.study_storage) else (storage,))
    (trial_dir / results.RESULT_FILE).unlink(missing_ok=True)  # never read back a stale record
    trial = {**trial, "dir": str(trial_dir), "records": counts, "environment": git_state(),
             "scheduler_job": scheduler_job(),
             "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
             "reports_signal": reporter is not None}
    plain = {**to_plain(cfg), "trial": trial}
    results.write_config(trial_dir, plain)

    timeout_s = float(cfg.train.worker_timeout_s)
    preexec = runtime.limits(cfg.train.memory_limit_mb, then=cpu.preexec(cfg.cpu))
    # A sweep's trials fork from a warm worker (src/warm.py), keyed by what preexec does; a single trial
    # would only pay the same imports in another process.
    # A submitit job runs one trial in its own process: a warm worker there would serve nobody else.
    warm_key = ((cfg.train.memory_limit_mb, tuple(cpu.parse_cores(cfg.cpu.cores) or ()))
                if cfg.train.warm_worker and trial.get("job_num") is not None
                and not os.environ.get(SUBMITIT_ENV) else None)
    try:
        with relay.Relay(reporter, trial_dir) if reporter is not None else contextlib.nullcontext():
            with scheduler_signals():  # only while the worker runs: before and after, a record stands
                exit_ = runtime.run_worker(trial_dir, runtime.worker_env(cfg), timeout_s, preexec=preexec,
                                           python=quant.worker_python(cfg.quant, cfg.paths.ipex_python),
                                           warm_key=warm_key)
    except KeyboardInterrupt:
        # The worker is already killed (run_worker); the trial still gets its record, as interrupted.
        _record_cut_short(plain, trial, trial_dir)
        raise
    except Exception as exc:  # e.g. the scheduler stopped the job (SchedulerStop): the worker is killed too
        _record_cut_short(plain, trial, trial_dir, {
            "type": type(exc).__name__, "message": str(exc),
            "traceback": "" if isinstance(exc, SchedulerStop) else traceback.format_exc()})
        raise
    try:
        result, worker_wrote_it = results.read(trial_dir), True
    except (OSError, ValueError, TypeError):
        died = {"type": "WorkerDied", "message": exit_.describe(timeout_s), "traceback": exit_.log_tail}
        result, worker_wrote_it = _failed_without_record(plain, trial, died, exit_.wall_s), False
    if result.status == "completed" and not exit_.ok:
        log.warning("the worker wrote a completed record, then %s", exit_.describe(timeout_s))
    # The worker's wall time as the parent saw it (process start and exit included): kept in the record.
    result.timings["trial_wall_s"] = exit_.wall_s
    try:
        results.write(trial_dir, result)
    except results.RecordError as exc:
        if not worker_wrote_it:
            raise  # no record at all: the sweep must say so
        log.warning("%s; trial_wall_s is only in the local log", exc)
    tracking.track(result, trial_dir, cfg.logger)
    _announce(result, trial_dir)
    return result


def _record_cut_short(plain: dict[str, Any], trial: dict[str, Any], trial_dir: Path,
                      error: dict[str, str] | None = None) -> None:
    if (trial_dir / results.RESULT_FILE).exists():
        return  # the worker finished its record just before the interrupt: it stands
    result = _failed_without_record(plain, trial, error or {
        "type": "Interrupted", "message": "interrupted (SIGINT) before the trial finished; the worker was "
        "stopped. Run the same command again to measure it", "traceback": ""}, 0.0)
    try:
        results.write(trial_dir, result)
    except results.RecordError as exc:
        log.warning("%s", exc)


def _announce(result: TrialResult, trial_dir: Path) -> None:
    if result.status == "completed":
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result.objectives.items())
        log.info("trial %s completed: %s (%s)", result.trial.get("id"), shown, trial_dir / results.RESULT_FILE)
    elif result.status == "pruned":
        log.info("trial %s %s (%s)", result.trial.get("id"), pruning.reason(pruning.record_step({"run": result.run})),
                 trial_dir / results.RESULT_FILE)
    else:
        log.error("trial %s %s: %s (%s)", result.trial.get("id"), result.status,
                  (result.error or {}).get("message"), trial_dir / results.RESULT_FILE)


def _study_info(cfg: DictConfig, overrides: list[str]) -> dict[str, Any] | None:
    """The Optuna study and trial a sweeper assigned to this job, with the values of its searched keys."""
    if cfg.study.name is None:
        return None
    values = overrides_.values(overrides)
    # the sweeper names a key as typed (+confirm); its override value is keyed without the prefix
    params = {k: values.get(overrides_.bare(k)) for k in cfg.study.params}
    # a searched knob of a PEFT method this trial did not choose (lora.r when peft=ia3) is not read
    ignored = {k: v for k, v in params.items() if not adapters.applies(cfg, overrides_.bare(k))}
    info = {"name": cfg.study.name, "trial": cfg.study.trial,
            "params": {k: v for k, v in params.items() if k not in ignored}}
    if ignored:
        info["ignored_params"] = ignored
    return info


def trial_identity(cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
    """The trial's directory and name, from Hydra's job: one directory = one trial."""
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        group = "_".join(Path(hc.sweep.dir).parts[-2:])
        ident = f"{group}-{hc.job.num}"
    else:
        group, ident = "single", "_".join(Path(hc.run.dir).parts[-2:])
    # As typed: an override such as train.lr='${nope.x}' must reach the schema check unresolved.
    task = [str(o) for o in OmegaConf.to_container(hc.overrides.task, resolve=False)]  # type: ignore[union-attr]
    overrides = redact.scrub([o for o in task if not o.startswith("study.")])
    info = {"id": ident, "group": group, "job_num": hc.job.num if hc.mode == RunMode.MULTIRUN else None,
            "overrides": overrides, "study": _study_info(cfg, task)}
    return Path(hc.runtime.output_dir), info


register_configs()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> list[float] | None:
    """Run one trial; return its objectives in declared order, or None when it did not complete."""
    # `kill -USR1 <pid>` prints every thread's stack to stderr: where a run that seems stuck is waiting.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        trial_dir, info = trial_identity(cfg)
    except OmegaConfBaseException as exc:  # study.name='${nope}': nothing has started, not even a record
        log.error("%s", _unresolved(exc))
        sys.exit(EXIT_BAD_INPUT)
    # Hydra has already dumped the command line into .hydra/: a storage URL's password must not stay there.
    redact.scrub_files(trial_dir / ".hydra")
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = run_trial(cfg, trial_dir, info)
    except (ConfigError, data.DataError, results.RecordError) as exc:
        log.error("%s", exc)
        if multirun:
            raise  # the sweeper records this job as failed, with the message
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        if multirun:
            raise  # the sweeper fails the trial as stale and stops
        record, _ = results.load(trial_dir / results.RESULT_FILE)
        status = (record or {}).get("status")
        log.error("interrupted: %s", f"the trial is recorded as {status} in {trial_dir / results.RESULT_FILE}"
                  if status else "before the trial started; nothing was recorded")
        sys.exit(EXIT_INTERRUPTED)
    if result.status != "completed":
        if not multirun:
            sys.exit(EXIT_TRIAL_FAILED)  # a script or CI must not take a failed trial for success
        return None
    return [result.objectives[o.name] for o in cfg.objectives]


# Exit codes of a single trial (a sweep exits 0, or 1 when it stops: its trials' outcomes are in the study).
EXIT_TRIAL_FAILED = 1    # the trial ran and failed: result.json says why
EXIT_BAD_INPUT = 2       # refused before any work: the message names the key and the fix
EXIT_INTERRUPTED = 130   # Ctrl-C, as shells report SIGINT


def cli() -> None:
    redact.guard_process()  # before Hydra parses anything: its errors may quote a storage URL
    main()


if __name__ == "__main__":
    cli()
