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
from typing import Any

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


SLURM_PROGRAMS = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "scancel", "squeue", "scontrol", "sinfo",
                  "mariadbd", "mariadb-install-db")


class Slurm:
    """A throwaway single-node SLURM cluster on loopback: slurmctld and slurmd with no munge (auth/none,
    cred/none), proctrack/pgid, select/cons_tres, and accounting through slurmdbd into its own MariaDB,
    because submitit reads every job's state from ``sacct``. All of it runs as root (the tests' user
    where Debian's packages are installed) with its files under ``root``; clients find it through
    ``SLURM_CONF``."""

    def __init__(self, root: Path, cpus: int | None = None, memory_mb: int = 8192) -> None:
        missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None]
        if missing:
            require(f"SLURM ({', '.join(missing)})", "Debian packages slurmctld slurmd slurm-client slurmdbd "
                    "mariadb-server; `make setup` installs them as root")
        if os.geteuid() != 0:
            require("a SLURM cluster this user may start", "its daemons run as root: run the tests as root")
        self.root = root
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.conf = root / "slurm.conf"
        self.db_port, self.dbd_port, self.ctld_port, self.d_port = (free_port() for _ in range(4))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout, env=self.env)

    def _daemon(self, name: str, *args: str) -> None:
        log = (self.root / f"{name}.out").open("wb")
        self.procs.append(subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def _wait(self, what: str, ok: Any, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(self.root.glob("*.log"))
                                 if f.is_file())
                raise RuntimeError(f"SLURM test cluster: {what} did not come up (exited: {dead})\n{logs}")
            time.sleep(0.3)

    def start(self) -> None:
        r = self.root
        for sub in ("db", "state", "spool"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        # MariaDB for slurmdbd alone: loopback, no grant tables (nothing else can reach it)
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={r / 'db'}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       capture_output=True, check=True, timeout=120)
        self._daemon("mariadb", "mariadbd", "--no-defaults", f"--datadir={r / 'db'}", "--user=root",
                     f"--socket={r / 'mysql.sock'}", f"--port={self.db_port}", "--bind-address=127.0.0.1",
                     "--skip-grant-tables", f"--pid-file={r / 'mariadb.pid'}", f"--log-error={r / 'mariadb.log'}")
        self._wait("MariaDB", lambda: _port_open(self.db_port))
        dbd = r / "slurmdbd.conf"
        dbd.write_text("\n".join([
            "AuthType=auth/none", "DbdHost=localhost", "DbdAddr=127.0.0.1", f"DbdPort={self.dbd_port}",
            "SlurmUser=root", "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
            f"StoragePort={self.db_port}", "StorageUser=root", "StorageLoc=slurm_acct_db",
            f"PidFile={r / 'slurmdbd.pid'}", f"LogFile={r / 'slurmdbd.log'}", "DebugLevel=info", ""]))
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read
        self.conf.write_text("\n".join([
            "ClusterName=paretune", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.d_port}", "AuthType=auth/none", "CredType=cred/none", "SlurmUser=root",
            "SlurmdUser=root", "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
            f"AccountingStoragePort={self.dbd_port}", "ReturnToService=2", "MinJobAge=3600", "KillWait=30",
            "SchedulerType=sched/builtin", "SlurmctldTimeout=30", "SlurmdTimeout=30",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""]))
        self._daemon("slurmdbd", "slurmdbd", "-D")
        self._wait("slurmdbd", lambda: _port_open(self.dbd_port))
        self._daemon("slurmctld", "slurmctld", "-D", "-i")
        self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False).returncode == 0
                   and "UP" in self.run("scontrol", "ping", check=False).stdout)
        self._daemon("slurmd", "slurmd", "-D", "-N", "localhost")
        self._wait("slurmd", lambda: self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
                   in ("idle", "mixed", "allocated"))
        # the cluster is known to the accounting database once slurmctld has registered it
        self._wait("accounting", lambda: "paretune" in self.run("sacctmgr", "-n", "-P", "list", "cluster",
                                                                 "format=cluster", check=False).stdout)

    def sacct(self, *jobs: str) -> list[dict[str, str]]:
        """``sacct`` rows of the given jobs (all this cluster's when none): JobID, JobName, State, ExitCode,
        Elapsed, AllocCPUS, ReqMem, Submit, Start, End."""
        fields = ["JobID", "JobName", "State", "ExitCode", "Elapsed", "AllocCPUS", "ReqMem", "Submit", "Start", "End"]
        args = ["sacct", "-X", "-n", "-P", "-a", f"--format={','.join(fields)}", "-S", "now-1days"]
        if jobs:
            args += ["-j", ",".join(jobs)]
        out = self.run(*args).stdout
        return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.run("scancel", "--user=root", check=False, timeout=20)
            # let the jobs' steps end before their daemons go (a test that failed may leave some running)
            deadline = time.monotonic() + 45  # past KillWait: a job that ignores SIGTERM is killed then
            while self.run("squeue", "-h", check=False, timeout=20).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for p in reversed(self.procs):  # slurmd, slurmctld, slurmdbd, then the database
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 15)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 9)
                p.wait(timeout=10)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def slurm(root: Path, **kw: Any) -> Iterator[Slurm]:
    cluster = Slurm(root, **kw)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
