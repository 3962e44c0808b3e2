"""Faults injected for real into a trial's worker: an exception, a memory limit, SIGKILL, a hang.
Each becomes a failed trial with its reason, the next trial runs, and the failure limit holds."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from src.sweeper import study as S
from tests.conftest import TINY, wait_for_training

# A model too big for the memory limit below (about 1.5 GB of fp32 weights), and a limit that still
# lets the worker import torch and transformers.
BIG = ["model.shape.hidden_size=2048", "model.shape.intermediate_size=8192", "model.shape.num_layers=4",
       "model.shape.num_heads=16", "model.shape.num_kv_heads=4"]
LIMIT_MB = 2500


def _cmd(tmp_path: Path, data_root: Path, cache_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "src.train", *args, *TINY, f"data.root={data_root}",
            f"paths.cache_dir={cache_dir}", "logger=none"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PARETUNE_STUDY_STORAGE": str(tmp_path / "studies" / "paretune.journal")}


def _records(sweep: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/result.json")}


def test_each_worker_fault_is_a_failed_trial_and_the_sweep_goes_on(tmp_path, data_root, cache_dir):
    """One sweep, three trials: the worker raises (a layer that does not exist), runs out of memory
    under a real RLIMIT_AS, then a healthy trial completes."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(_cmd(tmp_path, data_root, cache_dir, "--config-dir", str(_fault_configs(tmp_path)),
                               "-m", f"hydra.sweep.dir={sweep}", "hydra.sweeper.max_failure_rate=0.9",
                               f"train.memory_limit_mb={LIMIT_MB}", "+fault=raises,oom,none"),
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = _records(sweep)
    assert [records[i]["status"] for i in range(3)] == ["failed", "failed", "completed"]
    assert "no_such_layer" in records[0]["error"]["message"]
    oom = records[1]["error"]
    assert oom["message"].startswith(f"out of memory: the trial needed more than the train.memory_limit_mb={LIMIT_MB}")
    study = _study(tmp_path, sweep)
    states = [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == ["FAIL", "FAIL", "COMPLETE"]
    assert "out of memory" in study.trials[1].user_attrs["error"]


def _study(tmp_path: Path, sweep: Path) -> optuna.Study:
    """The study a sweep recorded into (its name from multirun.yaml, the storage _env points at)."""
    import yaml

    name = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["sweeper"]["study_name"]
    return optuna.load_study(study_name=name, storage=S.open_storage(str(tmp_path / "studies" / "paretune.journal")))


def _fault_configs(tmp_path: Path) -> Path:
    """A `fault` config group: each option breaks one trial in its own way (none: a healthy trial)."""
    root = tmp_path / "faults"
    (root / "fault").mkdir(parents=True, exist_ok=True)
    (root / "fault" / "none.yaml").write_text("# @package _global_\n{}\n")
    (root / "fault" / "raises.yaml").write_text("# @package _global_\nlora:\n  target_modules: [no_such_layer]\n")
    shape = "\n".join(f"    {o.split('=')[0].split('.')[-1]}: {o.split('=')[1]}" for o in BIG)
    # plan_memory off: the planner would refuse it before any work (tests/test_plan.py); here the worker's
    # own out-of-memory path is what is tested
    (root / "fault" / "oom.yaml").write_text(f"# @package _global_\nmodel:\n  shape:\n{shape}\n"
                                             "train:\n  plan_memory: false\n")
    return root


def _worker_pid(trial_dir: Path, timeout_s: float = 120) -> int:
    """The trial's worker process, from the first line it logs (a fresh process or a warm worker's fork)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            found = re.search(r"worker pid (\d+) \(", (trial_dir / "worker.log").read_text(errors="replace"))
            if found:
                return int(found.group(1))
        time.sleep(0.1)
    raise AssertionError("the worker never started")


def test_a_worker_killed_by_sigkill_is_a_failed_trial_and_the_next_runs(tmp_path, data_root, cache_dir):
    """The kill lands while the first trial trains: the tiny model trains 100 steps a second, so a fixed
    sleep could miss it; here the steps are unbounded and a time budget ends the second, healthy trial."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(_cmd(tmp_path, data_root, cache_dir, "-m", f"hydra.sweep.dir={sweep}",
                                 "hydra.sweeper.max_failure_rate=0.9", "lora.r=2,4")
                            + ["train.max_steps=1000000", "train.time_budget_s=3"],
                            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        pid = _worker_pid((sweep / "0").resolve())
        wait_for_training((sweep / "0").resolve(), timeout_s=300)
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    records = _records(sweep)
    assert records[0]["status"] == "failed" and records[0]["error"]["message"].startswith("worker killed by SIGKILL")
    assert records[1]["status"] == "completed"
    assert not list(sweep.rglob(".result.json.*.tmp"))  # no half-written record left behind


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts: it runs nothing any more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def test_a_hung_worker_is_killed_at_its_budget_and_the_failure_limit_stops_the_sweep(tmp_path, data_root,
                                                                                     cache_dir):
    """The first worker hangs for real: it is stopped (SIGSTOP) as soon as it starts, so it neither runs
    nor exits. It must be killed when train.worker_timeout_s has passed, not much later; with
    max_failure_rate=0 the sweep then stops, says why, and the second trial never starts."""
    budget, slack = 8, 4  # slack: the sweep's poll, the kill and this test's own 0.1 s polling
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(_cmd(tmp_path, data_root, cache_dir, "-m", f"hydra.sweep.dir={sweep}",
                                 "hydra.sweeper.max_failure_rate=0", f"train.worker_timeout_s={budget}",
                                 "lora.r=2,4"),
                            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        pid = _worker_pid((sweep / "0").resolve())
        os.kill(pid, signal.SIGSTOP)
        started = _started_s(pid)  # the kernel's record of the worker's start: no polling delay in it
        hung_at = time.monotonic()
        while not _gone(pid) and time.monotonic() - hung_at < budget + slack + 5:
            time.sleep(0.1)
        lived = _uptime_s() - started
        # the budget counts from the worker's start: killed at budget s, not much later, never before
        assert budget - 0.5 <= lived <= budget + slack, f"the hung worker lived {lived:.1f} s"
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "max_failure_rate" in err, err[-3000:]
    records = _records(sweep)
    assert list(records) == [0]
    assert records[0]["error"]["message"] == f"worker killed after the {budget} s timeout (train.worker_timeout_s)"
    assert budget <= records[0]["timings"]["worker_wall_s"] <= budget + slack


def _started_s(pid: int) -> float:
    """When the process started, in seconds since boot (field 22 of /proc/<pid>/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _uptime_s() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def test_postgresql_restarted_under_two_workers_loses_and_doubles_nothing(tmp_path, pg):
    """The server goes down for 5 s (fast shutdown: open connections are cut) while two workers share a
    study: both wait it out and finish, every trial is counted once, none is lost or left running."""
    from tests.test_study import SPACE, check_study, load, sweep

    name, n = "pg-restart", 12
    args = [*SPACE, f"hydra.sweeper.n_trials={n}", f"hydra.sweeper.study_name={name}", "sleep_s=0.5"]
    procs = [sweep(tmp_path, pg.url, *args, sweep_dir=f"w{i}", wait=False) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(tmp_path.glob("w*/*/result.json"))) < 3:
            time.sleep(0.2)
        pg.restart(down_s=5)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert any("database unavailable" in err for _, err in outs)  # the outage did refuse a call
    study = load(pg.url, name)
    check_study(study, n)
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == n


def test_a_full_disk_fails_the_trial_clearly_and_keeps_earlier_records(tmp_path, data_root, cache_dir):
    """The sweep folder is a 2 MB tmpfs that fills up while the second trial's worker runs."""
    import threading

    from tests.system import require

    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        require("a small tmpfs", f"mounting one needs root: {mounted.stderr.decode().strip()}")
    try:
        sweep = small / "sweep"

        def fill_when_trial_1_runs() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not (sweep / "1" / "worker.log").exists():
                time.sleep(0.05)
            with contextlib.suppress(OSError), open(small / "ballast", "wb") as fh:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()

        filler = threading.Thread(target=fill_when_trial_1_runs, daemon=True)
        filler.start()
        proc = subprocess.run(_cmd(tmp_path, data_root, cache_dir, "-m", f"hydra.sweep.dir={sweep}",
                                   "lora.r=2,4"), cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                              timeout=600)
        filler.join(timeout=10)
        assert proc.returncode == 0, proc.stderr[-3000:]
        first = json.loads((sweep / "0" / "result.json").read_text())  # written before the disk filled
        assert first["status"] == "completed"
        study = _study(tmp_path, sweep)
        second = sorted(study.trials, key=lambda t: t.number)[1]
        assert second.state.name == "FAIL"
        assert "No space left on device" in second.user_attrs["error"]
        assert "run the same command again" in second.user_attrs["error"]
        assert not list(sweep.rglob(".result.json.*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def _single(tmp_path: Path, data_root: Path, cache_dir: Path, *args: str,
            env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], dict]:
    run = tmp_path / "run"
    cmd = [a for a in _cmd(tmp_path, data_root, cache_dir, f"hydra.run.dir={run}", *args) if a != "logger=none"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**_env(tmp_path), **(env or {})}, capture_output=True, text=True,
                          timeout=600)
    return proc, json.loads((run / "result.json").read_text())


def test_wandb_that_cannot_write_is_a_warning_not_a_failure(tmp_path, data_root, cache_dir):
    """W&B's folder is taken by a file: the trial completes and is recorded locally, with a warning."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb").write_text("not a folder")
    proc, record = _single(tmp_path, data_root, cache_dir, "logger=wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert record["status"] == "completed"
    assert "W&B logging failed" in proc.stderr and "the trial is recorded in" in proc.stderr


def test_wandb_online_without_a_key_is_a_warning_not_a_failure(tmp_path, data_root, cache_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"WANDB_API_KEY": "", "HOME": str(tmp_path), "WANDB_SILENT": "true", "WANDB_INIT_TIMEOUT": "20"})
    proc, record = _single(tmp_path, data_root, cache_dir, "logger=wandb", "logger.mode=online", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert record["status"] == "completed"
    assert "W&B logging failed" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_sweep_killed_mid_trial_resumes_with_the_same_command(tmp_path, data_root, cache_dir, sig):
    """Trial 0 completes, the sweep is stopped during trial 1; the same command then completes the grid:
    trial 0 is not run again, the lost trial is failed and run again, nothing is half-written, and
    the stopped sweep's worker did not outlive it."""
    sweep = tmp_path / "sweep"
    # the last of repeated overrides wins: trials that train until their time budget, so that the signal
    # lands while trial 1 trains however fast the machine is
    cmd = [*_cmd(tmp_path, data_root, cache_dir, "-m", f"hydra.sweep.dir={sweep}", "lora.r=2,4,8"),
           "train.max_steps=1000000", "train.time_budget_s=3"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        worker = _worker_pid((sweep / "1").resolve(), timeout_s=300)
        first = (sweep / "0" / "result.json").read_bytes()
        wait_for_training((sweep / "1").resolve(), timeout_s=300)
        proc.send_signal(sig)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and Path(f"/proc/{worker}").exists():
        time.sleep(0.2)
    assert not Path(f"/proc/{worker}").exists(), "the worker outlived its sweep"
    assert not (sweep / "1" / "result.json").exists() or json.loads(
        (sweep / "1" / "result.json").read_text())["status"] == "failed"

    resumed = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (sweep / "0" / "result.json").read_bytes() == first  # completed trial intact, not re-run
    study = _study(tmp_path, sweep)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert trials[1].state.name == "FAIL"  # the lost trial: failed on the way out, or found stale
    done = sorted(t.params["lora.r"] for t in trials if t.state.name == "COMPLETE")
    assert done == [2, 4, 8]  # r=2 once (not re-run), r=4 run again, r=8 run
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert not list(sweep.rglob(".result.json.*.tmp"))
