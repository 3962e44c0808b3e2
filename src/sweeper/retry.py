"""An RDB storage whose calls survive a database restart or a dropped connection.

Optuna's RDBStorage gives up on the first failed query (``StorageInternalError`` around a commit,
SQLAlchemy's ``OperationalError`` elsewhere), which would end a sweep of many hours because the
database server restarted for a second. ``pool_pre_ping`` replaces dead pooled connections, but not
a query that was in flight; this wrapper retries each storage call, with backoff, for up to
``retry_s`` seconds. A failed transaction was rolled back by the server, so running it again does not
count anything twice; a call that did commit before its answer was lost is caught by Optuna's own
checks (finishing a finished trial raises ``UpdateFinishedTrialError``, which is not retried).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy.exc

log = logging.getLogger("paretune.sweeper")

TRANSIENT = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError,
             sqlalchemy.exc.InterfaceError)


def retrying(fn: Callable[..., Any], retry_s: Callable[[], float], what: str | None = None) -> Callable[..., Any]:
    """``fn`` called again after transient database errors until ``retry_s()`` seconds have passed."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        deadline, delay = time.monotonic() + retry_s(), 0.5
        while True:
            try:
                return fn(*args, **kwargs)
            except TRANSIENT as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("database unavailable during %s (%s); retrying in %.1f s", what or fn.__name__,
                            type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    return call


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage with every public storage call wrapped by ``retrying``."""

    retry_s = 120.0


# Private RDBStorage calls made from outside it: Optuna's _CachedStorage (which wraps every RDB
# storage a study uses) and its heartbeat code call these directly, so they need the retry too. The
# other private helpers run inside a session one of the wrapped calls opened; retrying that call
# covers them. tests/test_sweeper.py checks this list against Optuna's source.
CALLED_FROM_OUTSIDE = ("_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
                       "_get_stale_trial_ids")


def _wrap_methods() -> None:
    for name, member in vars(optuna.storages.RDBStorage).items():
        if not callable(member) or isinstance(member, (staticmethod, classmethod)):
            continue
        if name.startswith("_") and name not in CALLED_FROM_OUTSIDE:
            continue

        def method(self: RetryingRDBStorage, *args: Any, _fn: Callable[..., Any] = member, _name: str = name,
                   **kwargs: Any) -> Any:
            return retrying(_fn, lambda: self.retry_s, _name)(self, *args, **kwargs)

        functools.update_wrapper(method, member)
        setattr(RetryingRDBStorage, name, method)


_wrap_methods()
