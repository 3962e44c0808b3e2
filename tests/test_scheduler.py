"""The submitit launcher under our sweepers (src/sweeper/scheduler.py), without a cluster: per-job resources,
no requeueing, a job that ended without a result as a failed JobReturn, queued jobs cancelled on the way
out. tests/test_slurm.py runs the same path on a real SLURM cluster."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf
from submitit.core.utils import FailedJobError, UncompletedJobError

from src.sweeper import scheduler
from src.train import job_resources


class FakeJob:
    def __init__(self, job_id: str, error: BaseException | None = None, state: str = "COMPLETED") -> None:
        self.job_id, self.error, self.state, self.cancelled = job_id, error, state, False

    def results(self) -> list[Any]:
        if self.error is not None:
            raise self.error
        return [f"return of {self.job_id}"]

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True

    def done(self, force_check: bool = False) -> bool:
        return False


class FakeExecutor:
    """submitit's AutoExecutor as the launcher uses it: parameters, then one map_array per batch."""

    arrays: list[tuple[dict[str, Any], Any, list[tuple[Any, ...]]]] = []

    def __init__(self) -> None:
        self.parameters: dict[str, Any] = {"cpus_per_task": 4, "mem_gb": 16}
        self._executor = self  # AutoExecutor keeps its backend's parameters there (the same dict)
        FakeExecutor.arrays = []

    def update_parameters(self, **kw: Any) -> None:
        self.parameters.update(kw)

    def map_array(self, fn: Any, *iterables: Any) -> list[FakeJob]:
        calls = list(zip(*iterables, strict=True))
        if self.parameters["cpus_per_task"] > 64:  # as sbatch refuses a request no node can meet
            raise RuntimeError("sbatch: error: Batch job submission failed: Requested node configuration is "
                               "not available")
        FakeExecutor.arrays.append((dict(self.parameters), fn, calls))
        return [FakeJob(f"{len(FakeExecutor.arrays)}_{i}") for i in range(len(calls))]


def _launch_args(*overrides: list[str]) -> tuple[list[Any], ...]:
    # what the launcher passes: overrides, job dir key, job number, job id, singleton state
    calls = [(list(o), "hydra.sweep.dir", n, f"job_id_for_{n}", {}) for n, o in enumerate(overrides)]
    return tuple(list(c) for c in zip(*calls, strict=True))


def test_each_job_asks_for_its_own_resources_and_jobs_come_back_in_order():
    wanted = {"cpu.threads=1": {"cpus_per_task": 1, "mem_gb": None},
              "cpu.threads=2": {"cpus_per_task": 2, "mem_gb": 3.0},
              "cpu.threads=null": {"cpus_per_task": None, "mem_gb": None}}
    executor = scheduler._executor_class(FakeExecutor, lambda ovr: wanted[ovr[0]], "SLURM", [])()
    jobs = executor.map_array("launcher", *_launch_args(["cpu.threads=2"], ["cpu.threads=1"], ["cpu.threads=2"],
                                                        ["cpu.threads=null"]))
    no_requeue = {"additional_parameters": {"no_requeue": True}}  # SLURM must not requeue behind the study
    assert [params for params, _, _ in FakeExecutor.arrays] == [
        {"cpus_per_task": 2, "mem_gb": 3.0, **no_requeue},
        {"cpus_per_task": 1, "mem_gb": 16, **no_requeue},  # unset: the launcher's own, not the group before's
        {"cpus_per_task": 4, "mem_gb": 16, **no_requeue}]  # nothing asked: the launcher's settings alone
    assert [[c[2] for c in calls] for _, _, calls in FakeExecutor.arrays] == [[0, 2], [1], [3]]  # numbers kept
    assert [j.job_id for j in jobs] == ["1_0", "2_0", "1_1", "3_0"]  # in the order the sweeper gave them
    assert executor.parameters == {"cpus_per_task": 4, "mem_gb": 16, **no_requeue}  # put back afterwards
    fn = FakeExecutor.arrays[0][1]
    assert isinstance(fn, scheduler.NoRequeue) and fn.launcher == "launcher" and fn.checkpoint(1, 2) is None


def test_a_job_the_scheduler_refuses_fails_its_trial_and_the_others_are_submitted():
    wanted = {"cpu.threads=128": {"cpus_per_task": 128}, "cpu.threads=1": {"cpus_per_task": 1}}
    executor = scheduler._executor_class(FakeExecutor, lambda ovr: wanted[ovr[0]], "SLURM", [])()
    refused, ok = executor.map_array("launcher", *_launch_args(["cpu.threads=128"], ["cpu.threads=1"]))
    [ret] = refused.results()
    assert ret.status == JobStatus.FAILED and str(ret._return_value) == (
        "SLURM refused the job (cpus_per_task=128): sbatch: error: Batch job submission failed: Requested node "
        "configuration is not available; lower cpu.threads or train.memory_limit_mb, or choose another "
        "hydra.launcher.partition")
    assert ok.results() == ["return of 1_0"]


def test_a_submission_error_that_is_not_about_resources_stops_the_sweep():
    # a wrong partition (or slurmctld down) would fail every trial alike: the launcher's error stands
    class WrongPartition(FakeExecutor):
        def map_array(self, fn: Any, *iterables: Any) -> list[FakeJob]:
            raise RuntimeError("sbatch: error: invalid partition specified: cpu")

    executor = scheduler._executor_class(WrongPartition, lambda ovr: {"cpus_per_task": 2}, "SLURM", [])()
    with pytest.raises(RuntimeError, match="invalid partition"):
        executor.map_array("launcher", *_launch_args(["cpu.threads=2"]))
    # nor is a refusal of the launcher's own settings (no trial asked for its own): nothing to blame a trial for
    refused = scheduler._executor_class(FakeExecutor, lambda ovr: {}, "SLURM", [])()
    refused.parameters["cpus_per_task"] = 128
    with pytest.raises(RuntimeError, match="Requested node configuration"):
        refused.map_array("launcher", *_launch_args(["a=1"]))


class Launcher:
    """A picklable stand-in for the launcher submitit sends to the job."""

    def __call__(self, *args: Any) -> str:
        return f"ran {args}"


def test_the_submitted_callable_runs_the_launcher_and_never_asks_to_be_requeued():
    fn = pickle.loads(pickle.dumps(scheduler.NoRequeue(Launcher())))
    assert fn(["a=1"], 3) == "ran (['a=1'], 3)"
    assert fn.checkpoint(["a=1"], 3) is None  # submitit then ends the job instead of resubmitting it


def test_a_job_the_scheduler_ended_is_a_failed_return_with_its_state():
    lost = FakeJob("12_3", UncompletedJobError("Job 12_3 (task: 0) with path /x/12_3_result.pkl\n"
                                               "has not produced any output (state: CANCELLED by 0)"),
                   state="CANCELLED by 0")
    [ret] = scheduler.Settled(lost, "SLURM").results()
    assert ret.status == JobStatus.FAILED
    assert str(ret._return_value) == "SLURM job 12_3 ended CANCELLED by 0 without a result"
    [ok] = scheduler.Settled(FakeJob("12_4"), "SLURM").results()
    assert ok == "return of 12_4"
    # sacct unreachable as well: the reason still names the job
    nowhere = FakeJob("13_0", UncompletedJobError("has not produced any output"), state="UNKNOWN")
    # submitit's FailedJobError: a heading, the trace, and the error on its last line
    failed = FakeJob("14_0", FailedJobError("Job (task=0) failed during processing with trace:\n"
                                            "----------------------\nTraceback (most recent call last):\n"
                                            "  File \"x.py\", line 1, in <module>\n"
                                            "ModuleNotFoundError: No module named 'src'\n\n"
                                            "----------------------\n"
                                            "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at "
                                            "paths:\n  - /x/14_0_0_log.err\n  - /x/14_0_0_log.out"),
                     state="FAILED")
    assert str(scheduler.Settled(failed, "SLURM").results()[0]._return_value) == (
        "SLURM job 14_0 ended FAILED with an error: ModuleNotFoundError: No module named 'src'")
    assert "SLURM job 13_0 ended without a result" in str(scheduler.Settled(nowhere, "SLURM").results()[0]
                                                          ._return_value)


def test_an_interrupted_launch_cancels_the_jobs_it_submitted(monkeypatch):
    import submitit

    class Interrupted:
        """A launcher interrupted (Ctrl-C) while it waits for the jobs it submitted."""

        def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
            executor = submitit.AutoExecutor()  # looked up at call time, as the real launcher does
            self.jobs = executor.map_array("launcher", *_launch_args(*job_overrides))
            raise KeyboardInterrupt

    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    launcher = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        scheduler.SchedulerLauncher(launcher, None).launch([["a=1"], ["a=2"]], 0)
    assert [j.job_id for j in launcher.jobs] == ["1_0", "1_1"] and all(j.job.cancelled for j in launcher.jobs)
    assert submitit.AutoExecutor is FakeExecutor  # the launcher's executor is put back


@pytest.mark.parametrize("cpu,train,expected", [
    # the job holds the trial's own process beside the worker's limit: 512 MB more, in whole MB
    ({"threads": 2, "cores": None}, {"memory_limit_mb": 3072}, {"cpus_per_task": 2, "mem_gb": 3.5}),
    ({"threads": None, "cores": "0-3"}, {"memory_limit_mb": None}, {"cpus_per_task": 4, "mem_gb": None}),
    ({"threads": None, "cores": None}, {"memory_limit_mb": None}, {"cpus_per_task": None, "mem_gb": None}),
])
def test_a_trial_asks_its_job_for_its_threads_and_memory_limit(cpu, train, expected):
    assert job_resources(OmegaConf.create({"cpu": cpu, "train": train})) == expected


def test_a_cluster_without_accounting_is_refused_before_the_study_opens(tmp_path, monkeypatch):
    # submitit reads job states from sacct: without slurmdbd a cancelled job would never be seen to end
    fake = tmp_path / "bin" / "sacct"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")

    class SlurmLauncher:  # named as the plugin's
        pass

    with pytest.raises(scheduler.SchedulerError, match="accounting storage is disabled.*slurmdbd"):
        scheduler.SchedulerLauncher(SlurmLauncher(), None).check()

    class LocalLauncher:
        pass

    scheduler.SchedulerLauncher(LocalLauncher(), None).check()  # submitit's local queue needs no sacct
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert "sacct is not installed" in (scheduler.accounting_problem() or "")
