"""The Optuna side of a sweep: storage, the study, an atomic "ask", leases on running trials.

Optuna's own heartbeat (``heartbeat_interval`` on RDBStorage) only works for RDB storage and only
inside ``study.optimize``; our sweepers drive trials with ask/tell and must work on a journal file
too. So a running trial carries a lease in its user attrs (owner host + pid, ``lease_until``),
renewed by a thread while the trial runs. Another sweeper, or the same command started again,
fails a trial whose lease ran out, or whose owner process is gone from this host, and can retry its
parameters once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from hydra.errors import CompactHydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    check_distribution_compatibility,
)
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from src.redact import mask_url, scrub_text
from src.sweeper import journal
from src.sweeper.retry import TRANSIENT, RetryingRDBStorage, retrying

log = logging.getLogger(__name__)

# User attrs written on every trial; analysis reads them back from the study alone.
RESULT_PATH = "result_path"
STATUS = "status"
ERROR = "error"
METRICS = "metrics"
OWNER = "owner"
LEASE_UNTIL = "lease_until"
STALE = "stale"            # the trial was failed because its worker was lost or interrupted
RETRY_OF = "retry_of"      # this trial re-runs the parameters of that (stale) trial number
OVERRIDES = "overrides"
SEED = "seed"              # the seed a trial ran with (when the sweeper knows the task's seed key)
REPEAT_OF = "repeat_of"    # the trial whose parameters this one repeats (reused values, or a new seed)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class StudyError(CompactHydraException, RuntimeError):
    """The sweep cannot go on (storage, search space or too many failed trials); the message says why.

    A CompactHydraException: Hydra prints its message alone, without a traceback (HYDRA_FULL_ERROR=1
    shows one), and exits 1."""


def default_study_name(prefix: str, *parts: Any) -> str:
    """A stable name from what defines the study, so the same command resumes the same study."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{prefix}-{digest}"


def _is_url(storage: str) -> bool:
    return "://" in storage


def _create_rdb(url: str) -> optuna.storages.RDBStorage:
    """RDBStorage whose schema is created by exactly one process, even when several start at once.

    Two workers creating Optuna's tables at the same moment race on ``alembic_version``
    (UniqueViolation). On PostgreSQL a session-level advisory lock serialises the creation; the
    later workers then find the tables and skip it.
    """
    import sqlalchemy as sa

    if not url.startswith("postgresql"):
        return RetryingRDBStorage(url)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY_SCHEMA})
            try:
                storage = RetryingRDBStorage(url, engine_kwargs={"pool_pre_ping": True})
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY_SCHEMA})
    finally:
        engine.dispose()
    return storage


_LOCK_KEY_SCHEMA = 0x70617265  # "pare": arbitrary constants naming our advisory locks
_LOCK_KEY_ASK = 0x74756E65     # "tune"


STORAGE_SCHEMES = ("postgresql", "sqlite")  # with a driver or not: postgresql+psycopg2://


def supported_scheme(url: str) -> bool:
    """Whether a storage URL names a database our sweepers can open and lock."""
    return url.split("://", 1)[0].split("+", 1)[0] in STORAGE_SCHEMES


def open_storage(storage: str | None) -> optuna.storages.BaseStorage:
    """A URL (postgresql://, sqlite:///) opens an RDB; None an in-memory study (Hydra's Optuna sweeper's
    ``storage: null``); anything else is a journal file path."""
    if storage is None:
        return optuna.storages.InMemoryStorage()
    if _is_url(storage):
        scheme = storage.split("://", 1)[0]
        if not supported_scheme(storage):
            raise StudyError(f"hydra.sweeper.storage: unsupported scheme '{scheme}://'; use "
                             "postgresql://user:pass@host/db, sqlite:///path.db, or a journal file path")
        try:
            return _create_rdb(storage)
        except Exception as exc:  # noqa: BLE001 - driver errors vary; the user needs the URL and the cause
            raise StudyError(f"hydra.sweeper.storage: cannot open {mask_url(storage)}: "
                             f"{type(exc).__name__}: {_first_line(exc)}; check the host, port, user and "
                             "password, and that the server is running") from exc
    path = Path(storage).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = journal.TornTailJournal(str(path))
        journal.check(path)
    except OSError as exc:
        raise StudyError(f"hydra.sweeper.storage: cannot use journal file {path}: {exc.strerror or exc}; "
                         "choose a writable folder (hydra.sweeper.storage or PARETUNE_STUDY_STORAGE)") from exc
    except journal.JournalDamaged as exc:
        raise StudyError(str(exc)) from exc
    return optuna.storages.JournalStorage(backend)


def describe_storage(storage: str | None) -> str:
    return "memory (storage: null; gone when the sweep ends)" if storage is None else str(mask_url(storage))


def _first_line(exc: BaseException) -> str:
    """A driver's error without its SQL echo and documentation links (psycopg prints several lines)."""
    return (str(exc).strip().splitlines() or [""])[0]


def ask_lock_key(study_name: str) -> int:
    """The PostgreSQL advisory lock key under which workers count and ask the trials of one study."""
    return _LOCK_KEY_ASK ^ int(hashlib.sha256(study_name.encode()).hexdigest()[:7], 16)


@contextlib.contextmanager
def study_lock(storage: optuna.storages.BaseStorage, storage_spec: str, study_name: str) -> Iterator[None]:
    """Serialise "count, then ask" across processes, so N workers never overshoot n_trials.

    ``storage`` is the one ``open_storage`` returned (Optuna wraps it in a cache inside the study, which
    hides its type). PostgreSQL: an advisory lock held on its own connection, so workers on any machine,
    started in any folder, are serialised by the server. A journal file or an SQLite database: a file
    lock beside it (those live on one machine's file system anyway).
    """
    if isinstance(storage, optuna.storages.RDBStorage) and storage_spec.startswith("postgresql"):
        with _advisory_lock(storage, ask_lock_key(study_name)):
            yield
        return
    if _is_url(storage_spec) and not storage_spec.startswith("sqlite:///"):
        raise StudyError(f"hydra.sweeper.storage: no lock for {mask_url(storage_spec)}; use postgresql:// or "
                         "a journal file path")
    target = storage_spec.split(":///", 1)[-1] if _is_url(storage_spec) else storage_spec
    with FileLock(f"{Path(target).expanduser()}.{hashlib.sha256(study_name.encode()).hexdigest()[:8]}.lock"):
        yield


@contextlib.contextmanager
def _advisory_lock(storage: optuna.storages.RDBStorage, key: int) -> Iterator[None]:
    import sqlalchemy as sa

    def lock() -> sa.Connection:
        conn = storage.engine.connect()
        try:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        except BaseException:
            conn.close()
            raise
        return conn

    conn = retrying(lock, lambda: RetryingRDBStorage.retry_s, "the study lock")()
    try:
        yield
    finally:
        # A server that restarted meanwhile has already dropped the lock with the session.
        with contextlib.suppress(*TRANSIENT):
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
        conn.close()


def check_resumed(study: optuna.Study, names: list[str] | None, directions: list[str],
                  distributions: dict[str, BaseDistribution]) -> None:
    """A study found by name must answer the same question as this sweep: the same objectives (names,
    when the app declares them, and directions) and value spaces Optuna can store beside the old ones.
    Checked before any trial is asked, so a mismatch changes nothing in the study."""
    name = study.study_name
    have = [d.name.lower() for d in study.directions]
    if have != directions:
        raise StudyError(f"study '{name}' exists with directions {have}, but the objectives declare {directions}; "
                         "set hydra.sweeper.study_name to a new name")
    if names is not None and study.metric_names is not None and list(study.metric_names) != names:
        raise StudyError(f"study '{name}' records the objectives {list(study.metric_names)}, but this sweep "
                         f"declares {names}; resuming would relabel the values of its trials. Restore `objectives`"
                         " or set hydra.sweeper.study_name to a new name")
    seen = recorded_distributions(study)
    for key, dist in distributions.items():
        old = seen.get(key)
        if old is None:
            continue
        try:
            check_distribution_compatibility(old, dist)
        except ValueError:
            raise StudyError(
                f"study '{name}' already has {key} as {_describe(old)}; this sweep gives it {_describe(dist)}, "
                "and an Optuna study cannot change a parameter's categories or kind. Run the new values in a "
                "study of their own (hydra.sweeper.study_name=<new name>), or keep the recorded ones") from None


def recorded_distributions(study: optuna.Study) -> dict[str, BaseDistribution]:
    """The distribution each parameter was first stored with in the study (Optuna requires the same
    kind, and for categoricals the same choices, from every later trial)."""
    seen: dict[str, BaseDistribution] = {}
    for t in study.get_trials(deepcopy=False):
        for key, dist in t.distributions.items():
            seen.setdefault(key, dist)
    return seen


def _describe(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return f"the choices {list(dist.choices)}"
    assert isinstance(dist, IntDistribution | FloatDistribution)
    kind = "integers" if isinstance(dist, IntDistribution) else "floats"
    return f"{'log-scale ' if dist.log else ''}{kind} in [{dist.low}, {dist.high}]"


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_gone(owner: str | None) -> bool:
    """True when the owner ran on this host and its process no longer exists."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Leases:
    """Renews the lease of every trial this process runs, from a background thread."""

    def __init__(self, storage: optuna.storages.BaseStorage, lease_s: float) -> None:
        self.storage, self.lease_s = storage, lease_s
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self, trial_id: int) -> bool:
        """Hold the trial's lease from now on; False (nothing held) when another worker has already
        finished it, i.e. found it stale while this worker's first lease write was held up."""
        try:
            self._renew(trial_id)
        except UpdateFinishedTrialError:
            return False
        with self._lock:
            self._ids.add(trial_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="paretune-lease", daemon=True)
            self._thread.start()
        return True

    def release(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._ids)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _renew(self, trial_id: int) -> None:
        self.storage.set_trial_user_attr(trial_id, OWNER, owner_id())
        self.storage.set_trial_user_attr(trial_id, LEASE_UNTIL, time.time() + self.lease_s)

    def _loop(self) -> None:
        # Renew at a third of the lease, so one slow write never lets a live trial look stale.
        while not self._stop.wait(self.lease_s / 3):
            for trial_id in self.held():
                try:
                    self._renew(trial_id)
                except UpdateFinishedTrialError:
                    self.release(trial_id)
                except Exception as exc:  # noqa: BLE001 - a storage hiccup must not kill the sweep
                    log.warning("could not renew the lease of trial id %s: %s", trial_id, exc)


def fail_trial(study: optuna.Study, trial_id: int, reason: str, stale: bool = False) -> bool:
    """Mark a RUNNING trial failed with its reason; False if another process finished it first."""
    storage = study._storage  # noqa: SLF001 - ask/tell exposes no way to fail another process's trial
    try:
        storage.set_trial_user_attr(trial_id, ERROR, scrub_text(reason))
        storage.set_trial_user_attr(trial_id, STATUS, "failed")
        if stale:
            storage.set_trial_user_attr(trial_id, STALE, True)
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False


# (study id, trial id) -> when this process first saw the RUNNING trial without a lease
_UNLEASED: dict[tuple[int, int], float] = {}


def fail_stale(study: optuna.Study, now: float | None = None, grace_s: float = 120.0) -> list[FrozenTrial]:
    """Fail every RUNNING trial whose lease expired or whose owner process is gone.

    A trial with no lease yet is only just asked: its worker writes the lease right after the ask,
    under the study lock. That write can be held up (a PostgreSQL restart drops the connection, and
    with it the session-bound lock, while the write retries), so such a trial counts as lost only
    ``grace_s`` (the sweep's lease_s) after this process first saw it so, never at once. (Timed here,
    not from the trial's start: a database storage keeps that start in the asking host's local time.)"""
    now = time.time() if now is None else now
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        key = (study._study_id, t._trial_id)  # noqa: SLF001
        if t.user_attrs.get(LEASE_UNTIL) is None:
            _UNLEASED.setdefault(key, now)
        else:
            _UNLEASED.pop(key, None)
        lease = t.user_attrs.get(LEASE_UNTIL)
        owner = t.user_attrs.get(OWNER)
        if owner == owner_id():
            continue
        if _owner_gone(owner):
            why = f"its sweep process ({owner}) is gone"
        elif lease is not None and float(lease) < now:
            why = f"its lease expired (owner {owner or 'unknown'})"
        elif lease is None and _UNLEASED[key] + grace_s < now:
            why = f"it took no lease in the {grace_s:g} s since it was seen asked (its worker died while asking)"
        else:
            continue
        reason = f"stale: {why}; the worker was killed or lost"
        if fail_trial(study, t._trial_id, reason, stale=True):  # noqa: SLF001
            log.warning("trial %d: %s", t.number, reason)
            failed.append(t)
    return failed


def retry_stale(study: optuna.Study) -> list[int]:
    """Enqueue, once, the parameters of every stale trial not yet retried. Call under study_lock."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    queued = []
    for t in trials:
        if (t.state == TrialState.FAIL and t.user_attrs.get(STALE) and t.params
                and RETRY_OF not in t.user_attrs and t.number not in retried):
            study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number}, skip_if_exists=False)
            queued.append(t.number)
            log.info("trial %d: its parameters are queued for one retry", t.number)
    return queued


def counted(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count toward n_trials: finished or running. A retried stale failure is replaced by
    its retry, and a stale trial lost before it had parameters (killed mid-ask) never ran at all."""
    retried = {t.user_attrs.get(RETRY_OF) for t in trials if RETRY_OF in t.user_attrs}
    return sum(1 for t in trials if t.state in (*FINISHED, TrialState.RUNNING)
               and not (t.state == TrialState.FAIL and (t.number in retried or (t.user_attrs.get(STALE)
                                                                               and not t.params))))


def unique_pareto(study: optuna.Study) -> list[FrozenTrial]:
    """Optuna's best_trials, without exact repeats (same params and same values)."""
    seen, out = set(), []
    for t in sorted(study.best_trials, key=lambda t: t.number):
        key = json.dumps([t.params, t.values], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out
