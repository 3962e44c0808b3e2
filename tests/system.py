"""Real system components for tests (PostgreSQL, optuna-dashboard), started here and stopped after.

A component that is not installed skips its tests with the reason, except under `make test`
(PARETUNE_REQUIRE_SYSTEM=1), which installs them first: there a missing one is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def require(what: str, hint: str) -> None:
    message = f"{what} is not installed ({hint})"
    if os.environ.get("PARETUNE_REQUIRE_SYSTEM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


class Postgres:
    """A throwaway PostgreSQL cluster on loopback, run as the `postgres` user when we are root."""

    def __init__(self, root: Path) -> None:
        bindir = pg_bindir()
        if bindir is None:
            require("PostgreSQL", "Debian package `postgresql`; `make setup` installs it as root")
        assert bindir is not None
        self.bin, self.root = bindir, root
        self.data, self.sock = root / "data", root / "sock"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True, check=True, timeout=120)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if self.as_user:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-o", f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c max_connections=200",
                  "start")
        self.psql("CREATE USER paretune PASSWORD 's3cret-canary'")
        self.psql("CREATE DATABASE optuna OWNER paretune")  # not in a transaction: its own call

    def psql(self, sql: str, db: str = "postgres") -> str:
        return self._run(str(self.bin / "psql"), "-h", str(self.sock), "-p", str(self.port), "-U", "postgres", "-d", db,
                         "-v", "ON_ERROR_STOP=1", "-Atc", sql).stdout

    def restart(self, down_s: float = 0.0) -> None:
        """Fast shutdown (open connections are cut), ``down_s`` seconds with no server, then start again.
        A gap longer than the clients' call interval makes a refused call certain, not a matter of timing."""
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")
        time.sleep(down_s)
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-o", opts, "start")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://paretune:s3cret-canary@127.0.0.1:{self.port}/optuna"


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[Postgres]:
    pg = Postgres(root)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


def wait_http(url: str, timeout_s: float = 30) -> bytes:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback only
                return bytes(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
