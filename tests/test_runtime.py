"""The worker's environment and the reading back of what is in effect."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from omegaconf import OmegaConf

from src import hw, runtime

CPU_DEFAULTS = OmegaConf.load(Path(__file__).parents[1] / "conf/cpu/default.yaml")


def _cfg(threads=None, allow_download=False):
    return OmegaConf.create({"cpu": {**CPU_DEFAULTS, "threads": threads},
                             "model": {"allow_download": allow_download}, "paths": {"cache_dir": "/c"}})


def test_worker_env_sets_threads_and_stays_offline():
    env = runtime.worker_env(_cfg(threads=1), base={"PATH": "/bin", "WANDB_API_KEY": "canary-key"})
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["PARETUNE_THREADS"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "WANDB_API_KEY" not in env  # the worker never holds credentials


def test_worker_env_defaults_to_the_usable_cores():
    import os
    env = runtime.worker_env(_cfg(), base={})
    assert env["PARETUNE_THREADS"] == str(len(os.sched_getaffinity(0)))
    assert "HF_HUB_OFFLINE" not in runtime.worker_env(_cfg(allow_download=True), base={})


def test_allocator_is_read_from_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00 r-xp /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert hw.allocator_in_effect(maps) == "system"
    maps.write_text("7f00 r-xp /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4\n")
    assert hw.allocator_in_effect(maps) == "tcmalloc"
    assert hw.allocator_in_effect() == "system"  # this test process


def test_worker_exit_descriptions():
    assert "SIGKILL" in runtime.WorkerExit(-signal.SIGKILL, False, 1.0, "").describe(60)
    assert "out-of-memory" in runtime.WorkerExit(-signal.SIGKILL, False, 1.0, "").describe(60)
    assert "code 3" in runtime.WorkerExit(3, False, 1.0, "").describe(60)
    assert "60 s timeout" in runtime.WorkerExit(None, True, 60.0, "").describe(60)


def test_run_worker_streams_output_to_the_log_and_reports_a_crash(tmp_path, monkeypatch):
    # A stand-in interpreter whose "worker" prints and dies by a signal, as a crashed one would.
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport os, signal\nprint('loading', flush=True)\n"
                    "os.kill(os.getpid(), signal.SIGKILL)\n")
    fake.chmod(0o755)
    exit_ = runtime.run_worker(tmp_path, {"PATH": "/usr/bin:/bin"}, timeout_s=30, python=str(fake))
    assert exit_.returncode == -signal.SIGKILL and not exit_.ok
    assert "loading" in (tmp_path / "worker.log").read_text() and "loading" in exit_.log_tail


def test_hw_probe_reports_this_machine():
    import os

    from src import hw

    facts = hw.probe()
    assert facts["usable_cores"] == len(os.sched_getaffinity(0)) and facts["numa_nodes"] >= 1
    assert set(facts["flags"]) == set(hw.FLAGS_OF_INTEREST)
    assert all(isinstance(v, bool) for v in facts["flags"].values())
