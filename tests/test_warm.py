"""Warm workers (src/warm.py): a sweep's trials fork from a process that imported torch once per CPU
setting; each trial still reads its settings back in its own process, and nothing outlives the sweep."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src import runtime
from tests.conftest import TINY, wait_for_training

pytestmark = pytest.mark.slow


def _sweep(tmp_path: Path, data_root: Path, cache_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "src.train", "-m", *TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}",
            "logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PARETUNE_STUDY_STORAGE": str(tmp_path / "studies" / "paretune.journal")}


def _records(tmp_path: Path) -> list[dict]:
    paths = sorted((tmp_path / "sweep").glob("*/result.json"), key=lambda p: int(p.parent.name))
    return [json.loads(p.read_text()) for p in paths]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped runs nothing any more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _pids(trial_dir: Path, timeout_s: float = 120) -> tuple[int, int | None]:
    """The trial's worker pid and its warm worker's (None: a fresh process), from the worker's first line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = trial_dir / "worker.log"
        found = re.search(r"worker pid (\d+) \((?:fresh|forked from warm worker (\d+))\)",
                          log.read_text(errors="replace") if log.exists() else "")
        if found:
            return int(found.group(1)), int(found.group(2)) if found.group(2) else None
        time.sleep(0.1)
    raise AssertionError(f"{trial_dir}: the worker never started")


def test_trials_fork_from_one_warm_worker_per_cpu_setting_and_read_their_own_settings(tmp_path, data_root,
                                                                                     cache_dir):
    proc = subprocess.run(_sweep(tmp_path, data_root, cache_dir, "cpu.threads=1,2", "lora.r=2,4"),
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert [r["status"] for r in records] == ["completed"] * 4
    by_threads: dict[int, set[int]] = {}
    for r in records:
        process, threads = r["run"]["process"], r["config"]["cpu"]["threads"]
        assert process["start"] == "forked from warm worker" and process["pid"] != process["warm_worker_pid"]
        by_threads.setdefault(threads, set()).add(process["warm_worker_pid"])
        # read back inside the trial's own process, as for a fresh worker
        assert r["cpu"]["torch_threads"] == threads and r["cpu"]["env"]["OMP_NUM_THREADS"] == str(threads)
        assert r["timings"]["import_s"] < 0.5  # the imports were done once, in the warm worker
    assert len(by_threads[1]) == len(by_threads[2]) == 1 and by_threads[1] != by_threads[2]
    assert len({r["run"]["process"]["pid"] for r in records}) == 4
    for pids in by_threads.values():
        assert not _alive(next(iter(pids)))  # the warm workers ended with the sweep


def test_warm_worker_false_starts_a_fresh_process(tmp_path, data_root, cache_dir):
    proc = subprocess.run(_sweep(tmp_path, data_root, cache_dir, "train.warm_worker=false,true"),
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh, forked = (r["run"]["process"] for r in _records(tmp_path))
    assert fresh["start"] == "fresh" and fresh["warm_worker_pid"] is None
    assert forked["start"] == "forked from warm worker"


def test_a_warm_worker_killed_mid_trial_fails_that_trial_and_the_next_gets_a_new_one(tmp_path, data_root,
                                                                                     cache_dir):
    proc = subprocess.Popen(_sweep(tmp_path, data_root, cache_dir, "hydra.sweeper.max_failure_rate=0.9",
                                   "lora.r=2,4", "train.max_steps=400"),
                            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        worker, warm = _pids(tmp_path / "sweep" / "0")
        assert warm is not None
        wait_for_training(tmp_path / "sweep" / "0", timeout_s=120)
        os.kill(warm, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)  # the trial died with its warm worker (PDEATHSIG)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    first, second = _records(tmp_path)
    assert first["status"] == "failed" and first["error"]["type"] == "WorkerDied"
    assert second["status"] == "completed"
    assert second["run"]["process"]["warm_worker_pid"] not in (None, warm)


def test_a_sweep_killed_by_sigkill_leaves_neither_warm_worker_nor_trial_running(tmp_path, data_root, cache_dir):
    proc = subprocess.Popen(_sweep(tmp_path, data_root, cache_dir, "lora.r=2,4", "train.max_steps=400"),
                            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        worker, warm = _pids(tmp_path / "sweep" / "0")
        wait_for_training(tmp_path / "sweep" / "0", timeout_s=120)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 15
    while (_alive(worker) or _alive(warm)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(worker) and not _alive(warm)


def test_a_warm_worker_with_a_thread_running_refuses_to_fork(tmp_path, caplog):
    """numpy's OpenBLAS starts a pool of 2 when allowed to: a fork would copy one of those threads'
    state without the thread, so the trial gets a fresh process instead (None here)."""
    pool = runtime.WarmPool()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        assert pool.start(tmp_path, sys.executable, env, None, "key") is None
        assert "OS threads; forking it is unsafe" in caplog.text
        assert pool.start(tmp_path, sys.executable, env, None, "key") is None  # not tried again
    finally:
        pool.close()


def test_the_pool_keeps_the_warm_workers_used_last(tmp_path):
    """With room for one, a second environment's warm worker replaces the first (stopped), and a trial
    that fails in its forked child (here: a folder with no trial config) only fails that trial."""
    pool = runtime.WarmPool()
    pool.MAX_WARM = 1
    base = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OPENBLAS_NUM_THREADS": "1"}
    try:
        first = pool.start(tmp_path, sys.executable, {**base, "OMP_NUM_THREADS": "1"}, None, "a")
        assert first is not None and first.wait(timeout=120) != 0
        again = pool.start(tmp_path, sys.executable, {**base, "OMP_NUM_THREADS": "1"}, None, "a")
        assert again is not None and again.server is first.server  # the same warm worker, reused
        again.wait(timeout=120)
        second = pool.start(tmp_path, sys.executable, {**base, "OMP_NUM_THREADS": "2"}, None, "a")
        assert second is not None and second.server is not first.server
        second.wait(timeout=120)
        assert not _alive(first.server.proc.pid) and len(pool._servers) == 1  # noqa: SLF001
    finally:
        pool.close()


def test_the_worker_environment_has_no_wandb_settings_nor_the_jobs_trial(cfg_factory):
    """The worker never logs to W&B, nor reports to the study itself; and wandb sets WANDB_* in the sweep
    process once it has run, which must not change the environment, and so the warm worker, of the
    next trial."""
    from src.sweeper import pruning

    env = runtime.worker_env(cfg_factory("model=tiny"), base={"PATH": "/usr/bin", "WANDB_MODE": "offline",
                                                              "WANDB_API_KEY": "secret", "WANDB_DIR": "/x",
                                                              pruning.ENV: "3 minimize -1 study"})
    assert not [k for k in env if k.startswith("WANDB_")] and env["PATH"] == "/usr/bin"
    assert pruning.ENV not in env  # one trial's number: every trial would get its own warm worker
