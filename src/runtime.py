"""The trial's worker process: its environment (threads, allocator) and its life (spawn, stream its
output, enforce the timeout, report how it ended).

A fresh process per trial because thread pools, OpenMP settings and a preloaded allocator can only
be chosen before torch loads, and Hydra's launchers reuse one process for every job.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from src import cpu, results
from src.paths import PROJECT_ROOT

# Never handed to the worker: it needs no credentials, and a crash dump must not contain them.
# The worker needs neither: the W&B key, and the study storage URL (which may carry a password).
_SECRET_ENV = ("WANDB_API_KEY", "PARETUNE_STUDY_STORAGE")


def worker_env(cfg: Any, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the worker process, built from cfg.cpu and cfg.model."""
    env = dict(os.environ if base is None else base)
    for key in _SECRET_ENV:
        env.pop(key, None)
    env.update(cpu.env(cfg.cpu, cpu.threads_for(cfg.cpu)))
    env.update({
        "TOKENIZERS_PARALLELISM": "false",  # the tokenizer's own pool would compete for the same cores
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p),
    })
    # matplotlib (imported by bert-score) would otherwise write its font cache under $HOME.
    env["MPLCONFIGDIR"] = str(Path(cfg.paths.cache_dir) / "matplotlib")
    if not cfg.model.allow_download:
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def limits(memory_limit_mb: int | None, then: Callable[[], None] | None = None) -> Callable[[], None] | None:
    """A pre-exec hook capping the worker's address space (RLIMIT_AS), then running ``then``."""
    if memory_limit_mb is None:
        return then

    def apply() -> None:
        limit = int(memory_limit_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if then is not None:
            then()

    return apply


@dataclass
class WorkerExit:
    returncode: int | None
    timed_out: bool
    wall_s: float
    log_tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self, timeout_s: float) -> str:
        if self.timed_out:
            return f"worker killed after the {timeout_s:g} s timeout (train.worker_timeout_s)"
        if self.returncode is not None and self.returncode < 0:
            sig = signal.Signals(-self.returncode).name
            hint = " (often the kernel's out-of-memory killer)" if sig == "SIGKILL" else ""
            return f"worker killed by {sig}{hint}"
        return f"worker exited with code {self.returncode}"


def _tee(src: io.BufferedReader, log_path: Path, echo: BinaryIO) -> None:
    # Chunks, not lines: progress bars redraw with carriage returns and must reach the terminal live.
    # The pipe is drained to the end whatever happens to the log (a full disk): a worker blocked on a
    # full pipe would hang until its timeout instead of failing at once.
    try:
        log: BinaryIO | None = open(log_path, "ab")  # noqa: SIM115 - closed below, after the drain
    except OSError:
        log = None
    while chunk := src.read1(4096):
        if log is not None:
            try:
                log.write(chunk)
                log.flush()
            except OSError:
                log = None
        try:
            echo.write(chunk)
            echo.flush()
        except (OSError, ValueError):
            pass
    if log is not None:
        with contextlib.suppress(OSError):
            log.close()


def _tail(path: Path, n_bytes: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - n_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_worker(trial_dir: Path, env: dict[str, str], timeout_s: float, python: str = sys.executable,
               preexec: Callable[[], None] | None = None) -> WorkerExit:
    """Run ``python -m src.worker trial_dir`` in its own process group and wait for it.

    ``preexec`` runs in the child before it executes Python (e.g. pinning it to cores)."""
    log_path = trial_dir / results.WORKER_LOG
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "src.worker", str(trial_dir)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent(os.getpid(), preexec))
    assert proc.stdout is not None
    echo = getattr(sys.stderr, "buffer", sys.stderr)
    tee = threading.Thread(target=_tee, args=(proc.stdout, log_path, echo), daemon=True)
    tee.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    except BaseException:  # Ctrl-C or the sweep dying: never leave an orphan training run behind
        _kill_group(proc)
        raise
    finally:
        tee.join(timeout=10)
    return WorkerExit(proc.returncode, timed_out, time.perf_counter() - start, _tail(log_path))


def _die_with_parent(parent: int, then: Callable[[], None] | None) -> Callable[[], None]:
    """Pre-exec: the worker gets SIGKILL when the sweep process dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so no orphan keeps training, writing and taking the cores of the next sweep."""
    def apply() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)
        if then is not None:
            then()

    return apply


_PR_SET_PDEATHSIG = 1


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
