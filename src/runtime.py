"""The trial's worker process: its environment (threads, allocator) and its life (spawn, stream its
output, enforce the timeout, report how it ended).

A process per trial because thread pools, OpenMP settings and a preloaded allocator can only be
chosen before torch loads, and Hydra's launchers reuse one process for every job. In a sweep that
process is forked from a warm worker started with the same settings (src/warm.py, ``WarmPool``),
which has already paid for the imports; otherwise it is a fresh ``python -m src.worker``.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from src import cpu, results, warm
from src.paths import PROJECT_ROOT

log = logging.getLogger("paretune")

# Never handed to the worker: it needs no credentials, and a crash dump must not contain them.
# The worker needs neither: the W&B key, and the study storage URL (which may carry a password).
_SECRET_ENV = ("WANDB_API_KEY", "PARETUNE_STUDY_STORAGE")


def worker_env(cfg: Any, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the worker process, built from cfg.cpu and cfg.model."""
    env = dict(os.environ if base is None else base)
    for key in _SECRET_ENV:
        env.pop(key, None)
    # Nor W&B's settings: the worker never logs to W&B (the parent tracks the trial), and wandb sets some
    # of them in this process once it has run, which would change the environment, and with it the warm
    # worker a sweep's next trial forks from.
    for key in [k for k in env if k.startswith("WANDB_")]:
        del env[key]
    # Nor the job's own trial number for pruning (src/sweeper/pruning.ENV, set by Hydra for this job only):
    # the parent relays the worker's signal, and a per-trial value would give every trial its own warm worker.
    env.pop("PARETUNE_PRUNING", None)
    env.update(cpu.env(cfg.cpu, cpu.threads_for(cfg.cpu)))
    env.update({
        "TOKENIZERS_PARALLELISM": "false",  # the tokenizer's own pool would compete for the same cores
        # numpy's (and scipy's) OpenBLAS starts its pool when imported; torch does every heavy product with
        # its own threads. One thread also keeps a warm worker single-threaded, so it can fork (src/warm.py).
        "OPENBLAS_NUM_THREADS": "1",
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
               preexec: Callable[[], None] | None = None, warm_key: Hashable | None = None) -> WorkerExit:
    """Run ``python -m src.worker trial_dir`` in its own process group and wait for it.

    ``preexec`` runs in the child before it executes Python (e.g. pinning it to cores). With
    ``warm_key`` (which must identify what ``preexec`` does), the worker is forked from a warm worker
    started once with this interpreter, environment and ``preexec`` (src/warm.py); without one, or
    when no warm worker can serve, it is a fresh process."""
    log_path = trial_dir / results.WORKER_LOG
    proc: Any = None
    if warm_key is not None:
        proc = WARM.start(trial_dir, python, env, preexec, warm_key)
    # The worker's life, from its fork or start: a warm worker's own start is the sweep's time, not the trial's.
    start = time.perf_counter()
    if proc is None:
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
        if not tee.is_alive():
            proc.stdout.close()
    return WorkerExit(proc.returncode, timed_out, time.perf_counter() - start, _tail(log_path))


def _die_with_parent(parent: int, then: Callable[[], None] | None) -> Callable[[], None]:
    """Pre-exec: the worker gets SIGKILL when the sweep process dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so no orphan keeps training, writing and taking the cores of the next sweep."""
    def apply() -> None:
        warm.die_with(parent)
        if then is not None:
            then()

    return apply


def _kill_group(proc: Any) -> None:
    """SIGKILL the worker's process group, then reap the worker (a Popen, or a warm worker's _Forked)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ---- warm workers (src/warm.py): the parent's side -------------------------------------------------
class _Forked:
    """A trial's process forked by a warm worker, with the part of Popen's interface run_worker uses.

    Its exit status comes from the warm worker, which reaps it only once this side has acknowledged
    the exit: until then the pid stays taken (a zombie), so killing its process group can never reach
    a process that reused the pid."""

    def __init__(self, server: _WarmServer, pid: int, stdout: io.BufferedReader) -> None:
        self.server, self.pid, self.stdout = server, pid, stdout
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        try:
            message = self.server.receive(timeout)
        except TimeoutError:
            raise subprocess.TimeoutExpired(["src.worker", str(self.pid)], timeout or 0.0) from None
        if message is None or message.get("pid") != self.pid or "returncode" not in message:
            # The warm worker died (its children die with it: PDEATHSIG) or broke the protocol.
            self.server.close()
            self.returncode = -signal.SIGKILL
        else:
            self.returncode = int(message["returncode"])
            self.server.acknowledge(self.pid)
        self.server.busy = False
        return self.returncode


class _WarmServer:
    """One warm worker process and the socket to it."""

    def __init__(self, python: str, env: dict[str, str], preexec: Callable[[], None] | None,
                 ready_timeout_s: float) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock, self.busy, self.closed, self.refused = ours, False, False, False
        self.output = tempfile.TemporaryFile()  # noqa: SIM115 - its import warnings; read when it fails
        try:
            self.proc = subprocess.Popen([python, "-m", "src.warm", str(theirs.fileno())], env=env,
                                         stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT,
                                         pass_fds=(theirs.fileno(),), start_new_session=True,
                                         preexec_fn=_die_with_parent(os.getpid(), preexec))
        finally:
            theirs.close()
        try:
            ready = self.receive(ready_timeout_s)
        except BaseException:
            self.close()
            raise
        if ready is None or "ready" not in ready:
            self.close()
            raise OSError(f"the warm worker did not start: {self.output_tail()}")
        self.pid, self.import_s = int(ready["ready"]), float(ready["import_s"])

    def receive(self, timeout: float | None) -> dict[str, Any] | None:
        self.sock.settimeout(timeout)
        try:
            return warm.receive(self.sock)[0]
        except (ConnectionError, ValueError):
            return None

    def fork(self, trial_dir: Path) -> _Forked | str:
        """The trial's process, or why there is none (``refused`` tells a refusal from a broken worker)."""
        self.refused = False
        read_end, write_end = os.pipe()
        try:
            try:
                self.busy = True
                warm.send(self.sock, {"argv": [str(trial_dir)], "cwd": os.getcwd()}, [write_end])
            finally:
                os.close(write_end)  # the child holds its own copy; EOF comes when the child exits
            reply = self.receive(30.0)
        except (OSError, TimeoutError) as exc:  # it died while idle, or hangs: the trial starts fresh
            os.close(read_end)
            return f"the warm worker does not answer ({exc or type(exc).__name__})"
        except BaseException:  # Ctrl-C: a child may be forked already; it dies with its warm worker
            os.close(read_end)
            self.close()
            raise
        if reply is None or "pid" not in reply:
            os.close(read_end)
            self.busy = False
            self.refused = bool(reply and "refused" in reply)
            return str((reply or {}).get("refused") or f"no answer from the warm worker: {self.output_tail()}")
        return _Forked(self, int(reply["pid"]), os.fdopen(read_end, "rb"))

    def acknowledge(self, pid: int) -> None:
        """Tell the warm worker the child's exit was read: it may reap it now."""
        try:
            warm.send(self.sock, {"reap": pid})
        except OSError:
            self.close()

    def output_tail(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self.output.seek(0)
            return self.output.read()[-2000:].decode("utf-8", "replace").strip() or "(no output)"
        return "(no output)"

    def close(self) -> None:
        """Stop the warm worker: its loop ends on EOF; a busy one is killed (with its child)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=0 if self.busy else 5)  # an idle one ends on EOF; a busy one is killed now
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.output.close()


class WarmPool:
    """The warm workers of this process, one per (interpreter, environment, pre-exec settings), the
    ``MAX_WARM`` used last: each holds its imported libraries in memory (about 0.5 GB)."""

    MAX_WARM = 4

    def __init__(self) -> None:
        self._servers: dict[Hashable, _WarmServer] = {}
        self._refused: set[Hashable] = set()
        self._lock = threading.Lock()

    def start(self, trial_dir: Path, python: str, env: dict[str, str], preexec: Callable[[], None] | None,
              warm_key: Hashable, ready_timeout_s: float = 600.0) -> _Forked | None:
        """The trial's process forked from the matching warm worker (started now if there is none),
        or None for a fresh process: when that warm worker is busy with another trial, or cannot serve."""
        key = (python, tuple(sorted(env.items())), warm_key)
        with self._lock:
            if key in self._refused:
                return None
            server = self._servers.get(key)
            if server is not None and server.busy:
                return None  # another thread's trial: this one runs in a fresh process
            if server is not None and (server.closed or server.proc.poll() is not None):
                self._servers.pop(key).close()  # it died while idle (the OOM killer, a kill): start another
                server = None
            if server is None:
                try:
                    server = _WarmServer(python, env, preexec, ready_timeout_s)
                except (OSError, TimeoutError) as exc:
                    log.warning("no warm worker (%s); trials with these settings start fresh processes", exc)
                    self._refused.add(key)
                    return None
                idle = [k for k, v in self._servers.items() if not v.busy]
                while len(self._servers) >= self.MAX_WARM and idle:
                    self._servers.pop(idle.pop(0)).close()  # dicts keep order: the least recently used first
                self._servers[key] = server
            else:
                self._servers[key] = self._servers.pop(key)  # now the most recently used
            server.busy = True
        forked = server.fork(trial_dir)
        if isinstance(forked, str):
            with self._lock:
                if server.refused:  # it would refuse again: these settings get fresh processes from now on
                    self._refused.add(key)
                if self._servers.get(key) is server:
                    del self._servers[key]
            log.warning("no trial forked (%s); this one starts a fresh process%s", forked,
                        ", as will the next with these settings" if server.refused else "")
            server.close()
            return None
        return forked

    def close(self) -> None:
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.close()


WARM = WarmPool()
atexit.register(WARM.close)
