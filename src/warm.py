"""Warm workers: one process per worker environment that has imported torch and the trial's libraries
once, and forks a new child for each trial of a sweep.

A fresh worker spends about 5 s importing torch, transformers, peft and the metrics before any work
(measured on 2 cores), and a sweep paid it for every trial. A warm worker is started exactly as a
trial's worker would be (same interpreter, environment, CPU affinity and memory limit: everything torch,
OpenMP, MKL, oneDNN and a preloaded allocator read when they load), so a child forked from it has the
settings of its trial; the worker reads them back inside that child as before (``cpu.in_effect``). A
trial whose settings differ gets its own warm worker (``runtime.WarmPool`` keys them).

multiprocessing's forkserver does this for one environment per program, and gives its children
neither their own output pipe nor their own process group (how a trial is streamed, timed out and
killed); this module is that missing piece, on the same idea.

Fork copies only the calling thread, and a copied OpenMP pool hangs in the child. The server therefore
forks only while it has exactly one OS thread (read from /proc before every fork); otherwise it
refuses and the trial runs in a fresh process.

Protocol, one JSON message per SOCK_SEQPACKET packet:
    server -> parent  {"ready": pid, "import_s": s}          once, after the imports
    parent -> server  {"argv": [trial_dir], "cwd": dir} + the write end of the trial's output pipe (SCM_RIGHTS)
    server -> parent  {"pid": child} | {"refused": reason}
    server -> parent  {"pid": child, "returncode": code}     when the child has exited
    parent -> server  {"reap": child}                        the exit was read: the child is reaped now
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_MAX_MESSAGE = 1 << 16


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) when the other side has closed."""
    data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 1)
    return (json.loads(data) if data else None), fds


def os_threads() -> int:
    """This process's OS threads, Python's and native ones (OpenMP, tokenizers) alike."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1  # unknown: treated as unsafe


def preload() -> float:
    """Import what every trial imports (the worker's stages), without running anything that starts a
    thread pool; returns the seconds it took."""
    t0 = time.perf_counter()
    import src.worker  # noqa: F401
    from src import baseline, cost, cpu, data, evaluate, interference, loop, model, quant  # noqa: F401
    return time.perf_counter() - t0


def _name(comm: str) -> None:
    """The process's name in ps and top (its command line stays the warm worker's)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, comm.encode()[:15], 0, 0, 0)


def die_with(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG); exit at
    once if it already has. Used by every trial process: a fresh worker, a warm worker, its children."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _child(sock: socket.socket, out_fd: int, request: dict[str, Any], server_pid: int) -> None:
    """In the forked child: become the trial's own process group with its own output, then run it."""
    code = 70
    try:
        sock.close()
        os.setpgid(0, 0)  # its own group: the parent stops the trial with killpg, as a fresh worker
        _name("paretune-trial")
        die_with(server_pid)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        for fd in (null, out_fd):
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])  # the parent's, now (a Hydra job may have changed it)
        from src import worker

        os.environ[worker.WARM_WORKER_ENV] = str(server_pid)
        sys.argv = ["src.worker", *request["argv"]]
        worker.cli(sys.argv)  # exits the process
    except BaseException:  # noqa: BLE001 - nothing may return into the server's loop
        with contextlib.suppress(Exception):
            traceback.print_exc()
            sys.stderr.flush()
    os._exit(code)


def serve(sock: socket.socket) -> None:
    """The server's loop: one trial at a time, until the parent closes the socket."""
    _name("paretune-warm")
    import_s = preload()
    me = os.getpid()
    send(sock, {"ready": me, "import_s": import_s})
    while True:
        message, fds = receive(sock)
        if message is None:
            return
        threads = os_threads()
        if threads != 1 or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            send(sock, {"refused": f"the warm worker has {threads} OS threads; forking it is unsafe"
                        if threads != 1 else "no output descriptor came with the request"})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(sock, fds[0], message, me)
        os.close(fds[0])
        with contextlib.suppress(OSError):  # also here: the parent may killpg before the child's own call
            os.setpgid(pid, pid)
        send(sock, {"pid": pid})
        # Exited, not yet reaped: its pid stays taken until the parent has read the exit, so a kill of
        # its process group from the parent can never reach a process that reused the pid.
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        assert info is not None  # None only with WNOHANG
        code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        try:
            send(sock, {"pid": pid, "returncode": code})
            receive(sock)  # {"reap": pid}, or EOF when the parent is gone
        finally:
            os.waitpid(pid, 0)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m src.warm <socket fd> (started by src.runtime, not by hand)", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(argv[1]))
    try:
        serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
