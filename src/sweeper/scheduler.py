"""Trials as scheduler jobs: Hydra's submitit launcher (``hydra/launcher=submitit_slurm`` or
``submitit_local``) under our sweepers, where one lost job fails one trial, not the sweep.

hydra-submitit-launcher 1.2.0 submits a batch as a job array and waits with
``[j.results()[0] for j in jobs]``. A job that SLURM cancels, times out, preempts or loses with its
node leaves no result, so ``results()`` raises there: the other jobs' returns are lost and the sweep
ends. Its ``checkpoint`` also requeues a job that receives the time-limit or preemption signal, so a
trial would start again from scratch behind the study's back. Rather than copy its ``launch``, this
wraps the launcher: while ``launch`` runs, submitit's ``AutoExecutor`` (which it looks up at call
time) is a subclass whose ``map_array``

- gives each job the resources its own config asks for (the sweeper's ``job_resources`` hook:
  paretune maps ``cpu.threads`` to cpus per task and ``train.memory_limit_mb`` to memory), submitting
  one array per distinct set;
- submits a callable whose ``checkpoint`` returns None, so submitit does not requeue: the job ends
  with SLURM's state and its trial fails with it (the sweeper's own rules retry it);
- returns jobs whose ``results()`` give a failed ``JobReturn`` naming the job and SLURM's state
  (``SLURM job 12_3 CANCELLED by 0``) instead of raising.

If the sweep itself is interrupted while jobs are queued or running, they are cancelled
(``scancel``), so no trial keeps running without a sweep to record it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

from src.sweeper.study import StudyError

log = logging.getLogger("paretune.sweeper")

LAUNCHER_MODULE = "hydra_plugins.hydra_submitit_launcher"
# Per-job resources a ``job_resources`` hook may set: submitit's names, common to its executors.
RESOURCE_KEYS = ("cpus_per_task", "mem_gb")
# How sbatch says no node can meet a job's request (Slurm 22.05's messages).
RESOURCE_REFUSALS = ("Requested node configuration is not available", "Memory specification can not be satisfied",
                     "More processors requested than permitted", "CPU count per node can not be satisfied")


class SchedulerError(StudyError):
    """The scheduler cannot run the sweep's jobs as asked (raised before any job is submitted)."""


class SchedulerJobError(RuntimeError):
    """A job the scheduler ended without a result: its message names the job and the scheduler's state."""


def is_submitit(launcher: Any) -> bool:
    return type(launcher).__module__.startswith(LAUNCHER_MODULE)


class NoRequeue:
    """The launcher as submitit's callable, minus requeueing: ``checkpoint`` returns None, so a job that
    receives the time-limit or preemption signal ends (its trial fails with the reason) instead of being
    submitted again. Pickled to the job with the launcher inside."""

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher

    def __call__(self, *args: Any) -> Any:
        return self.launcher(*args)

    def checkpoint(self, *args: Any, **kwargs: Any) -> None:
        return None


class Settled:
    """A submitted job whose ``results()`` never raises for the job's fate: a job that ended without a
    result gives a failed JobReturn saying why. (An exception raised by the trial itself comes back
    through Hydra's ``run_job`` as a failed JobReturn already.)"""

    def __init__(self, job: Any, kind: str) -> None:
        self.job, self.kind = job, kind

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def results(self) -> list[JobReturn]:
        try:
            return list(self.job.results())
        except Exception as exc:  # noqa: BLE001 - submitit's UncompletedJobError, FailedJobError and kin
            return [failed_return(self.reason(exc))]

    def reason(self, exc: BaseException) -> str:
        """``SLURM job 12_3 ended TIMEOUT without a result (log: ...)``: the scheduler's state where it
        says more than that the process is gone, and the job's error log."""
        state = ""
        with contextlib.suppress(Exception):  # sacct may be gone too; the exception still says what it knows
            state = str(self.job.state)
        ended = f"ended {state}" if state and state not in ("UNKNOWN", "COMPLETED", "FINISHED") else "ended"
        text = str(exc).strip()
        if "has not produced any output" in text:  # submitit's words for a job killed before its result
            what = "without a result"
        else:  # submitit's FailedJobError: a heading, the trace between two dashed rules, then log paths
            parts = text.split("-" * 22)
            trace = parts[1] if len(parts) >= 3 else text
            lines = [line.strip() for line in trace.splitlines() if line.strip()]
            what = "with an error: " + (lines[-1] if lines else type(exc).__name__)
        where = f" (log: {self.job.paths.stderr})" if hasattr(self.job, "paths") else ""
        return f"{self.kind} job {self.job_id} {ended} {what}{where}"

    def finished(self) -> bool:
        """Whether the job left its result (a file check: no sacct call, which could hang)."""
        try:
            return bool(self.job.paths.result_pickle.exists())
        except Exception:  # noqa: BLE001 - a job without paths: take it as still running
            return False

    def cancel(self) -> None:
        with contextlib.suppress(Exception):
            self.job.cancel(check=False)


def _executor_class(base: type, resources: Callable[[Sequence[str]], dict[str, Any]] | None,
                    kind: str, submitted: list[Settled]) -> type:
    """An AutoExecutor whose map_array is the one described in the module docstring."""

    class Executor(base):  # type: ignore[misc, valid-type]
        def map_array(self, fn: Callable[..., Any], *iterables: Sequence[Any]) -> list[Any]:
            calls = list(zip(*iterables, strict=True))
            groups: dict[tuple[tuple[str, Any], ...], list[int]] = {}
            for i, args in enumerate(calls):  # args[0]: the job's overrides (the launcher's first argument)
                wanted = resources(args[0]) if resources is not None else {}
                key = tuple(sorted((k, v) for k, v in wanted.items() if k in RESOURCE_KEYS and v is not None))
                groups.setdefault(key, []).append(i)
            # the launcher's settings, put back before each group: update_parameters only adds, so one
            # group's values would otherwise carry over to the next (the dict is shared with the backend)
            params = self._executor.parameters
            if kind == "SLURM":  # SLURM itself requeues batch jobs on node failure or preemption by default
                params["additional_parameters"] = {**(params.get("additional_parameters") or {}),
                                                   "no_requeue": True}
            launcher_own = dict(params)
            jobs: list[Any] = [None] * len(calls)
            for key, members in groups.items():
                params.clear()
                params.update(launcher_own)
                asked = ", ".join(f"{k}={v}" for k, v in key)
                try:
                    if key:
                        self.update_parameters(**dict(key))
                        log.info("jobs %s: %s", [calls[i][2] for i in members], asked)
                    batch = super().map_array(NoRequeue(fn), *zip(*(calls[i] for i in members), strict=True))
                except Exception as exc:
                    # sbatch refused what these trials asked for: they fail, the sweep goes on. Anything
                    # else (slurmctld down, a wrong partition or account) would fail every trial alike,
                    # so it stops the sweep, as the launcher alone would.
                    if not (key and any(m in str(exc) for m in RESOURCE_REFUSALS)):
                        raise
                    why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                    for i in members:
                        jobs[i] = Refused(f"{kind} refused the job ({asked or 'the launcher settings'}): {why}; "
                                          "lower cpu.threads or train.memory_limit_mb, or choose another "
                                          "hydra.launcher.partition")
                    continue
                for i, job in zip(members, batch, strict=True):
                    jobs[i] = Settled(job, kind)
                    submitted.append(jobs[i])
            params.clear()
            params.update(launcher_own)
            return jobs

    return Executor


class Refused:
    """A job the scheduler would not take: its trial fails with the reason, the others run."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def results(self) -> list[JobReturn]:
        return [failed_return(self.reason)]


def failed_return(reason: str) -> JobReturn:
    ret = JobReturn()
    ret.status = JobStatus.FAILED
    ret._return_value = SchedulerJobError(reason)  # noqa: SLF001 - how Hydra stores a failure
    return ret


@contextlib.contextmanager
def _patched_executor(resources: Callable[[Sequence[str]], dict[str, Any]] | None, kind: str,
                      submitted: list[Settled]) -> Iterator[None]:
    import submitit

    original = submitit.AutoExecutor
    setattr(submitit, "AutoExecutor", _executor_class(original, resources, kind, submitted))  # noqa: B010
    try:
        yield
    finally:
        setattr(submitit, "AutoExecutor", original)  # noqa: B010


def accounting_problem() -> str | None:
    """Why submitit could not follow SLURM jobs here, or None. It reads every job's state from ``sacct``;
    without accounting (slurmdbd) a job that ends without a result is never seen to end, and the sweep
    would wait forever, so this is refused before the first job is submitted."""
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", "now", "-o", "JobID"], capture_output=True,
                             text=True, timeout=60)
    except FileNotFoundError:
        return "sacct is not installed on this submit host (Debian: slurm-client)"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sacct did not answer: {exc}"
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return f"sacct failed: {lines[-1] if lines else 'no output'}"
    return None


def cancel(jobs: list[Settled], kind: str) -> None:
    """Cancel jobs: SLURM's in one scancel with a time limit (a hung controller must not hold the sweep
    past Ctrl-C), submitit's local ones one by one."""
    if not jobs:
        return
    if kind == "SLURM":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", *(j.job_id for j in jobs)], capture_output=True, timeout=60)
        return
    for job in jobs:
        job.cancel()


class SchedulerLauncher:
    """Hydra's submitit launcher with the behaviour above; everything else is the launcher's own."""

    def __init__(self, launcher: Any, resources: Callable[[Sequence[str]], dict[str, Any]] | None) -> None:
        self.launcher = launcher
        self.resources = resources
        self.kind = "SLURM" if type(launcher).__name__.lower().startswith("slurm") else "submitit"

    def check(self) -> None:
        """Refuse, before the study is opened, a cluster whose jobs submitit could not follow."""
        problem = accounting_problem() if self.kind == "SLURM" else None
        if problem:
            raise SchedulerError(f"hydra/launcher: {problem}. submitit follows each job through sacct, which needs "
                                 "SLURM's accounting (slurmdbd); without it a cancelled job would keep the sweep "
                                 "waiting forever. Ask the cluster's administrators, or run the sweep without the "
                                 "launcher on each machine against one PostgreSQL study")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        submitted: list[Settled] = []
        try:
            with _patched_executor(self.resources, self.kind, submitted):
                return list(self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx))
        except BaseException:
            # Ctrl-C or a crash while jobs wait or run: nobody would record them, so they are cancelled
            # (a second Ctrl-C meanwhile must not leave the rest running)
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                cancel([job for job in submitted if not job.finished()], self.kind)
            finally:
                signal.signal(signal.SIGINT, previous)
            if submitted:
                log.warning("cancelled the sweep's %d submitted job(s): %s", len(submitted),
                            " ".join(j.job_id for j in submitted))
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.launcher, name)
