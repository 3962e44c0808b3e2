"""The pruning channel between a trial's worker and its Optuna trial, relayed by the parent process.

The worker holds no study credentials (runtime._SECRET_ENV), so it never talks to the study. Every
``eval.signal_every`` training steps it appends its signal (the eval loss on a fixed few examples) to
``signal.jsonl`` in the trial folder and waits for the answer. This relay, a thread of the parent
beside ``runtime.run_worker``, reports each new value to the trial (``src.sweeper.pruning.Reporter``),
writes ``prune.json`` when the study's pruner says stop, and answers every report in ``decided.json``
(the step, whether to stop, and the first step at which the next report can change anything: the
worker skips the reports the pruner would not read). The worker stops at the step it reported, so a
pruned trial does not pay one more step (about as long as a report's wait is short: measured, a step
is seconds, a decision milliseconds). Files rather than a pipe: the worker may be a fresh process or a
fork of a warm worker, and what it reported stays with its trial.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from src import results

log = logging.getLogger("paretune")


class Relay:
    """``with Relay(reporter, trial_dir):`` around the worker's run; ``pruned_at``: the step the pruner
    stopped the trial at, or None."""

    def __init__(self, reporter: Any, trial_dir: Path, poll_s: float = 0.05) -> None:
        self.reporter, self.poll_s = reporter, poll_s
        self.signal, self.prune = trial_dir / results.SIGNAL_FILE, trial_dir / results.PRUNE_FILE
        self.decided = trial_dir / results.DECIDED_FILE
        self.pruned_at: int | None = None
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prune-relay", daemon=True)

    def __enter__(self) -> Relay:
        for path in (self.signal, self.prune, self.decided):
            path.unlink(missing_ok=True)
        try:  # step 0: no report yet; the worker reads when its first report is due from here
            results.atomic_write_json(self.decided, {"step": 0, "prune": False,
                                                    "next": self.reporter.next_due()})
        except OSError as exc:  # the worker then reports at every cadence step
            log.warning("could not tell the trial when its first report is due (%s)", exc)
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stop.set()
        # bounded: a report stuck on an unreachable database must not hold up Ctrl-C or the next trial
        self._thread.join(timeout=30)
        if exc_type is None and not self._thread.is_alive():
            self.drain()  # what the worker wrote after the last poll

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.drain()

    def drain(self) -> None:
        """Report every complete line written since the last call, and answer each (after the trial is
        pruned, with 'stop' without asking the study again)."""
        try:
            with open(self.signal, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._offset += end
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
                step, value = int(row["step"]), float(row["value"])
            except (ValueError, KeyError, TypeError):
                log.warning("a line of the trial's signal could not be read; it is not reported")
                continue
            stop = self.pruned_at is not None  # once pruned, every later report is answered 'stop'
            judged = True
            if not stop:
                try:
                    stop = bool(self.reporter.report(step, value))
                except Exception as exc:  # noqa: BLE001 - a lost report never fails the trial: it trains on
                    judged = False  # its rung is not passed: the next cadence step reports again
                    log.warning("could not report the trial's signal to its study (%s); it trains on", exc)
            try:
                if stop and self.pruned_at is None:
                    self.pruned_at = step
                    results.atomic_write_json(self.prune, {"step": step, "value": value})
                # the worker waits for this answer (prune.json first: it is what the worker records)
                results.atomic_write_json(self.decided, {"step": step, "prune": stop,
                                                        "next": self.reporter.next_due() if judged else None})
            except OSError as exc:  # the worker's wait runs out, then it trains on; the relay goes on
                log.warning("could not answer the trial's report of step %d (%s)", step, exc)
