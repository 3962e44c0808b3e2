"""Trials as SLURM jobs, for real: a single-node cluster (slurmctld, slurmd, slurmdbd and MariaDB on
loopback, started here: tests/system.py) runs a 4-trial sweep on the tiny model through Hydra's
submitit launcher. One job is cancelled with scancel while its trial trains, another gets SLURM's
signal ahead of its time limit: those trials are FAILED with the reason, the other two complete, and
the same command again completes the study. Two sweeps from two folders share one PostgreSQL study
through the cluster. Also the local submitit queue under the Optuna sweeper, with one job's process
killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

from src.config import PROJECT_ROOT
from src.sweeper import study as S
from tests import system
from tests.conftest import TINY, wait_for_training

RANKS = (2, 4, 8, 16)


def _study(storage: Path, sweep: Path) -> optuna.Study:
    name = yaml.safe_load((sweep / "multirun.yaml").read_text())["study_name"]  # as the sweeper named it
    return optuna.load_study(study_name=name, storage=S.open_storage(str(storage)))


def _alive(pid: int) -> bool:
    """A process that still runs (a zombie left for a parent to reap does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _all_ended(cluster: system.Slurm) -> bool:
    """Every job in sacct has ended (a job's result is written just before its process exits, so SLURM
    may still call it RUNNING when the sweep is done)."""
    return all(r["State"] not in ("RUNNING", "PENDING", "COMPLETING") for r in cluster.sacct())


def _wait_for(what: str, ok, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_sweep_runs_as_slurm_jobs_and_a_cancelled_job_fails_only_its_trial(tmp_path, data_root, cache_dir):
    storage = tmp_path / "studies" / "paretune.journal"
    sweep = tmp_path / "sweep"
    # every trial trains until its time budget, so the cancel lands while one trains however fast the
    # machine is; one thread each, so two jobs share the node's cores and two wait in the queue
    cmd = [sys.executable, "-m", "src.train", "-m", "hydra/launcher=slurm", "hydra.sweeper.n_jobs=4",
           f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10",
           "hydra.launcher.mem_gb=2",  # the launcher's memory; each trial's train.memory_limit_mb (3G) wins
           f"lora.r={','.join(map(str, RANKS))}", *TINY, "train.max_steps=1000000", "train.time_budget_s=15",
           "cpu.threads=1", "train.memory_limit_mb=3072", f"data.root={data_root}", f"paths.cache_dir={cache_dir}",
           "logger=none"]
    with system.slurm(tmp_path / "slurm", cpus=2, memory_mb=8192) as cluster:
        env = {**cluster.env, "PARETUNE_STUDY_STORAGE": str(storage)}
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # the first trial to train is cancelled; its job id is in the config its parent wrote
            configs = lambda: sorted(sweep.glob("*/trial_config.json"))  # noqa: E731
            _wait_for("a trial's job to start", lambda: configs(), 300)
            victim = configs()[0].parent
            wait_for_training(victim, timeout_s=300)
            job = json.loads((victim / "trial_config.json").read_text())["trial"]["scheduler_job"]
            assert job and "_" in job  # an array task: <array job>_<index>
            worker = subprocess.run(["pgrep", "-f", f"src.worker {victim.resolve()}"], capture_output=True,
                                    text=True).stdout.split()
            assert len(worker) == 1, worker  # the trial's own fresh worker, inside the job
            cluster.run("scancel", job)
            cancelled_at = time.monotonic() - started
            # another trial that trains, early in its 15 s budget, gets what SLURM sends signal_delay_s
            # before a job's time limit
            def early_in_training() -> Path | None:
                for c in configs():
                    log = c.parent / "train_log.jsonl"
                    lines = log.read_text().splitlines() if log.exists() else []
                    if c.parent != victim and lines and json.loads(lines[-1])["train/elapsed_s"] < 6:
                        return c.parent
                return None

            found: list[Path] = []

            def pick() -> bool:  # one look: the trial chosen is the one signalled
                chosen = early_in_training()
                if chosen is not None:
                    found.append(chosen)
                return chosen is not None

            _wait_for("another trial early in training", pick, 300)
            timed = found[0]
            timed_job = json.loads((timed / "trial_config.json").read_text())["trial"]["scheduler_job"]
            # (scancel exits non-zero here although the job's steps get the signal: the trial's record tells)
            cluster.run("scancel", "--signal=USR2", timed_job, check=False)
            out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err[-4000:]
        assert not _alive(int(worker[0])), "the cancelled trial's worker outlived its job"
        study = _study(storage, sweep)
        trials = sorted(study.trials, key=lambda t: t.number)
        failed = {(sweep / str(t.number)).resolve(): t for t in trials if t.state.name == "FAIL"}
        assert len(trials) == 4 and set(failed) == {victim.resolve(), timed.resolve()}, [
            (t.number, t.state.name) for t in trials]
        lost = failed[victim.resolve()]
        assert f"SLURM job {job} was stopped by SIGTERM (scancel" in lost.user_attrs[S.ERROR], lost.user_attrs[S.ERROR]
        assert f"SLURM job {timed_job} reached the end of its time limit" in failed[timed.resolve()].user_attrs[S.ERROR]
        for t in failed.values():  # the trial's own record says the same
            record = json.loads((sweep / str(t.number) / "result.json").read_text())
            assert record["status"] == "failed" and record["error"]["message"] in t.user_attrs[S.ERROR]
        lost_ranks = {t.params["lora.r"] for t in failed.values()}
        assert sorted(t.params["lora.r"] for t in trials if t.state.name == "COMPLETE") == sorted(
            set(RANKS) - lost_ranks)
        # each job ran its trial's worker in the job, with the trial's resources; sacct says what SLURM saw
        _wait_for("every job to end", lambda: _all_ended(cluster), 60)
        rows = {r["JobID"]: r for r in cluster.sacct()}
        assert rows[job]["State"].startswith("CANCELLED"), rows
        done = [t for t in trials if t.state.name == "COMPLETE"]
        for t in done:
            record = json.loads(Path(t.user_attrs[S.RESULT_PATH]).read_text())
            row = rows[record["trial"]["scheduler_job"]]
            # one CPU per thread; memory_limit_mb (3 GB) and 512 MB for the trial's own process
            assert row["State"] == "COMPLETED" and row["AllocCPUS"] == "1" and row["ReqMem"] == "3.50G", row
            assert record["cpu"]["torch_threads"] == 1
        print(f"\nscancel {job} at {cancelled_at:.1f} s; sacct:\n" + "\n".join("|".join(r.values())
                                                                             for r in rows.values()))

        # the same command completes the study: the two lost cells run again, the others are kept
        again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-4000:]
        trials = sorted(_study(storage, sweep).trials, key=lambda t: t.number)
        assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials[4:])
        assert {t.params["lora.r"] for t in trials[4:]} == lost_ranks
        assert sorted(t.params["lora.r"] for t in trials if t.state.name == "COMPLETE") == sorted(RANKS)
        _wait_for("every job to end", lambda: _all_ended(cluster), 60)
        rows = cluster.sacct()
        assert len(rows) == 6 and all(r["State"] == "COMPLETED" for r in rows[-2:]), rows
        print("after the same command again:\n" + "\n".join("|".join(r.values()) for r in rows))


APP = PROJECT_ROOT / "tests" / "sweep_app" / "app.py"


def test_the_local_submitit_queue_runs_a_search_and_a_killed_job_fails_its_trial(tmp_path):
    """hydra/launcher=submitit_local under the Optuna sweeper (the cheap task): one job's process is
    killed; its trial fails with the reason and the search's other trials complete."""
    storage = tmp_path / "studies.journal"
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, str(APP), "--config-dir", str(PROJECT_ROOT / "conf"), "-m", "hydra/launcher=submitit_local",
           f"hydra.sweep.dir={sweep}", "x=interval(0,1)", "y=range(1,4)", "hydra.sweeper.n_trials=4",
           "hydra.sweeper.n_jobs=2", "hydra.sweeper.study_name=local", "hydra.sweeper.sampler.seed=1",
           "sleep_s=3"]
    env = {**os.environ, "PARETUNE_STUDY_STORAGE": str(storage), "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the process that runs a local job (under submitit's controller, which then reports it lost)
        def job_pids() -> list[int]:
            out = subprocess.run(["pgrep", "-f", f"submitit.core._submit {sweep}"], capture_output=True,
                                 text=True).stdout
            return [int(p) for p in out.split()]

        _wait_for("a local job", job_pids, 120)
        os.kill(job_pids()[0], 9)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    trials = optuna.load_study(study_name="local", storage=S.open_storage(str(storage))).trials
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"], [(t.number, t.state.name) for t in trials]
    [lost] = [t for t in trials if t.state.name == "FAIL"]
    assert "submitit job" in lost.user_attrs[S.ERROR] and "ended without a result" in lost.user_attrs[S.ERROR]


def test_two_sweeps_from_two_submit_hosts_share_one_postgresql_study_through_slurm(tmp_path, pg):
    """Two sweeps, each in its own folder as on two submit hosts, queue their trials as SLURM jobs of
    one cluster and draw them from one study on PostgreSQL: exactly n_trials trials, unique numbers,
    every one completed, each job accounted for in sacct."""
    name = "slurm-2-hosts"
    with system.slurm(tmp_path / "slurm", cpus=2, memory_mb=8192) as cluster:
        env = {**cluster.env, "PARETUNE_STUDY_STORAGE": pg.url, "PYTHONPATH": str(PROJECT_ROOT)}
        procs = []
        for host in ("host-a", "host-b"):
            (tmp_path / host).mkdir()
            cmd = [sys.executable, str(APP), "--config-dir", str(PROJECT_ROOT / "conf"), "-m", "hydra/launcher=slurm",
                   "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.sweep.dir=multirun",
                   "x=interval(0,1)", "y=range(1,4)", "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2",
                   f"hydra.sweeper.study_name={name}", "sleep_s=3"]  # long enough that both hosts get trials
            procs.append(subprocess.Popen(cmd, cwd=tmp_path / host, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-4000:]
        trials = optuna.load_study(study_name=name, storage=S.open_storage(pg.url)).trials
        assert sorted(t.number for t in trials) == list(range(6))
        assert all(t.state.name == "COMPLETE" for t in trials), [(t.number, t.state.name) for t in trials]
        hosts = {Path(t.user_attrs[S.RESULT_PATH]).parts[-4] for t in trials}
        assert hosts == {"host-a", "host-b"}  # both sweeps ran trials of the one study
        _wait_for("every job to end", lambda: _all_ended(cluster), 60)
        rows = cluster.sacct()
        assert len(rows) == 6 and all(r["State"] == "COMPLETED" and r["AllocCPUS"] == "1" for r in rows), rows
