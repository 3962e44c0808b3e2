"""Pruning trials that run as Hydra jobs, in this process or any other, single- or multi-objective.

Optuna's pruners assume the objective runs inside ``study.optimize`` (``trial.report`` then
``trial.should_prune``), and ``trial.report`` refuses multi-objective studies. Here a job reports to
its own trial through the study's storage and asks the study's pruner itself:

    reporter = pruning.reporter()            # None when the sweep does not prune
    for step in ...:
        if reporter is not None and reporter.report(step, value):
            raise optuna.TrialPruned()       # the sweeper tells the study PRUNED

The channel is the job's environment: the sweeper sets ``PARETUNE_PRUNING`` (trial number, the
signal's direction and orientation, study name) through ``hydra.job.env_set``, which Hydra applies in
whichever process runs the job (a launcher's worker too) and removes afterwards; the job builds the
pruner from its own ``hydra.sweeper.pruner`` and opens the storage its ``hydra.sweeper.storage``
names. An in-memory study is reachable only from the sweeper's own process (Hydra's basic launcher).

The rule, multi-objective studies included: a trial is pruned on one intermediate signal that stands
for one declared objective (``hydra.sweeper.prune_on``, the first by default), oriented as that
objective. The pruner sees the study through ``SignalStorage``: one direction (that objective's), and
each finished trial valued by its last intermediate value. A signal that runs the other way (a loss
reported for a maximised score) is stored negated, so that with one objective the samplers, which rank
pruned trials by their last intermediate value in the study's direction, read it the right way round;
with several, the signal is kept as trial system attrs instead (Optuna's samplers expect no
intermediate values in such a study: TPE would fail on them). The other objectives
(costs) never prune a trial: a cheap trial of poor quality is pruned even if its cost alone would have
put it on the Pareto front.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import optuna
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

ENV = "PARETUNE_PRUNING"

_MEMORY: dict[str, BaseStorage] = {}  # in-memory studies of this process, by study name


SIGNAL_ATTR = "signal:"  # + step: a multi-objective study's intermediate values, as trial system attrs


class SignalStorage(BaseStorage):
    """A study's storage as its pruner should see it: one direction, and every finished trial valued
    by its last intermediate value (it has no other single value in a multi-objective study). Writes
    of a pruner's own attrs go through unchanged.

    In a multi-objective study (``aside=True``) the signal is kept as system attrs (``SIGNAL_ATTR``),
    and shown to the pruner as intermediate values: Optuna's samplers never expect intermediate values
    there (TPE ranks pruned trials by them with ``study.direction``, which such a study refuses)."""

    def __init__(self, inner: BaseStorage, direction: StudyDirection, aside: bool = False) -> None:
        self.inner, self.direction, self.aside = inner, direction, aside

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return [self.direction]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._view(self.inner.get_trial(trial_id))

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return [self._view(t) for t in self.inner.get_all_trials(study_id, deepcopy=False, states=states)]

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        if self.aside:
            self.inner.set_trial_system_attr(trial_id, f"{SIGNAL_ATTR}{int(step)}", float(intermediate_value))
        else:
            self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def _view(self, trial: FrozenTrial) -> FrozenTrial:
        signal = signal_values(trial)
        if trial.state != TrialState.COMPLETE and not self.aside:
            return trial
        view = copy.copy(trial)
        if self.aside:
            view.intermediate_values = signal
        if trial.state == TrialState.COMPLETE:
            worst = math.inf if self.direction == StudyDirection.MINIMIZE else -math.inf
            # a completed trial that reported nothing can never be the best one
            view.values = [signal[max(signal)] if signal else worst]
        return view


def signal_values(trial: FrozenTrial) -> dict[int, float]:
    """A trial's reported signal by step: its intermediate values, or (multi-objective) the system attrs."""
    aside = {int(k[len(SIGNAL_ATTR):]): float(v) for k, v in trial.system_attrs.items() if k.startswith(SIGNAL_ATTR)}
    return aside or dict(trial.intermediate_values)


def _delegate(name: str) -> Callable[..., Any]:
    def method(self: SignalStorage, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)
    method.__name__ = name
    return method


for _name in BaseStorage.__abstractmethods__ - set(vars(SignalStorage)):
    setattr(SignalStorage, _name, _delegate(_name))
SignalStorage.__abstractmethods__ = frozenset()


class Reporter:
    """A running trial's link to its study: ``report(step, value)`` stores the value and says whether
    the study's pruner stops the trial here."""

    def __init__(self, storage: BaseStorage, study_name: str, trial_number: int, pruner: optuna.pruners.BasePruner,
                 direction: str, sign: float = 1.0) -> None:
        self.storage, self.sign = storage, sign
        study_id = storage.get_study_id_from_name(study_name)
        view = SignalStorage(  # type: ignore[abstract]  # its other methods are delegated, below the class
            storage, StudyDirection.MINIMIZE if direction == "minimize" else StudyDirection.MAXIMIZE,
            aside=len(storage.get_study_directions(study_id)) > 1)
        self.study = optuna.load_study(study_name=study_name, storage=view, pruner=pruner)
        self.trial_id = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, trial_number)  # noqa: SLF001
        self.last_step: int | None = None
        self.rungs = Rungs.of(pruner)  # before any prune(): an 'auto' min_resource is still unknown then

    def next_due(self) -> int | None:
        """The first step after the last report at which a report can change anything; None: every step."""
        return None if self.rungs is None else self.rungs.after(self.last_step or 0)

    def due(self, step: int) -> bool:
        """Whether a report at ``step`` can change anything: a job skips the costly signal where it cannot."""
        due = self.next_due()
        return due is None or step >= due

    def report(self, step: int, value: float) -> bool:
        """Store the signal at ``step`` (as reported; negated when it runs against the objective) and
        ask the pruner; True: stop the trial now."""
        stored = self.sign * float(value)
        self.study._storage.set_trial_intermediate_value(self.trial_id, int(step), stored)  # noqa: SLF001
        self.last_step = int(step)
        trial = self.study._storage.get_trial(self.trial_id)  # noqa: SLF001
        return bool(self.study.pruner.prune(self.study, trial))


@dataclass(frozen=True)
class Rungs:
    """The steps at which a pruner judges a trial, where that is all it reads: ``base * factor ** (rate + k)``."""

    base: int
    factor: int
    rate: int

    @classmethod
    def of(cls, pruner: optuna.pruners.BasePruner) -> Rungs | None:
        """Successive halving's rungs; None for a pruner that may read any step.

        Successive halving with a fixed ``min_resource`` judges a trial only at its rungs, on the value
        of its first report at or past each one: a report between two rungs is never read, so a trial
        that skips it is judged exactly as one that made it, and saves its cost (a second or more per
        report for paretune). With ``min_resource: auto`` the pruner estimates it from the finished
        trials' last steps, so they must report to the end; the median and percentile pruners take a
        trial's best value over all its steps, the others (Hyperband's brackets, Wilcoxon, patience,
        thresholds) any step: all of them get every report. Optuna's pruners do not say which steps
        they read; this reads the settings successive halving keeps (``_min_resource``...) when the
        pruner is built, before it could estimate one, and falls back to every step where they are not there.
        """
        if type(pruner) is not optuna.pruners.SuccessiveHalvingPruner:  # a subclass may judge differently
            return None
        base, factor, rate = (getattr(pruner, f"_{a}", None) for a in ("min_resource", "reduction_factor",
                                                                       "min_early_stopping_rate"))
        if not (isinstance(base, int) and isinstance(factor, int) and isinstance(rate, int)) \
                or base < 1 or factor < 2 or rate < 0:
            return None
        return cls(base, factor, rate)

    def after(self, step: int) -> int:
        """The first rung past ``step``."""
        k = 0
        while (rung := self.base * self.factor ** (self.rate + k)) <= step:
            k += 1
        return rung


ENV_OVERRIDE = f"++hydra.job.env_set.{ENV}="  # ++: added, or replaced if the app sets it


def env_override(study_name: str, trial_number: int, direction: str, sign: float) -> str:
    """The job override that tells the job its trial: ``'<trial> <direction> <sign> <study name>'``, quoted
    for Hydra's grammar. The job reads the pruner and the storage from its own ``hydra.sweeper``
    config, so no storage URL (nor its password) travels this way."""
    # Percent-encoded: Hydra unescapes only a backslash before a quote, and resolves ${...} in quoted values.
    return f"{ENV_OVERRIDE}'{int(trial_number)} {direction} {sign:+g} {quote(study_name, safe='')}'"


def _decode(raw: str) -> dict[str, Any]:
    trial, direction, sign, study = raw.split(" ", 3)
    return {"trial": int(trial), "direction": direction, "sign": float(sign), "study": unquote(study)}


def remember_memory(study_name: str, storage: BaseStorage) -> None:
    """An in-memory study's storage, for jobs run in this process."""
    _MEMORY[study_name] = storage


_FROM_JOB = object()


def reporter(storage: Any = _FROM_JOB, pruner: Any = _FROM_JOB, environ: dict[str, str] | None = None,
             ) -> Reporter | None:
    """The current job's reporter; None when the sweep does not prune (or did not start this job).
    ``storage`` (a journal path or URL; None: in memory) and ``pruner`` (its config, with ``_target_``)
    default to the job's own ``hydra.sweeper.storage`` and ``hydra.sweeper.pruner``."""
    raw = (os.environ if environ is None else environ).get(ENV)
    if not raw:
        return None
    from hydra.utils import instantiate

    from src.sweeper import study as S

    given = _decode(raw)
    if storage is _FROM_JOB or pruner is _FROM_JOB:
        from hydra.core.hydra_config import HydraConfig

        sweeper = HydraConfig.get().sweeper
        storage = sweeper.get("storage") if storage is _FROM_JOB else storage
        pruner = sweeper.get("pruner") if pruner is _FROM_JOB else pruner
    if storage is None:
        opened = _MEMORY.get(given["study"])
        if opened is None:
            raise RuntimeError(f"study '{given['study']}' is in memory in the sweeper's process; a job in another "
                               "process cannot report to it. Give hydra.sweeper.storage (a journal file or a URL)")
    else:
        opened = _opened(str(storage), S.open_storage)
    return Reporter(opened, given["study"], given["trial"], instantiate(pruner), given["direction"], given["sign"])


_OPENED: dict[str, BaseStorage] = {}


def _opened(spec: str, open_storage: Callable[[str], BaseStorage]) -> BaseStorage:
    """One storage per spec and process: a PostgreSQL pool is not rebuilt for every job."""
    if spec not in _OPENED:
        _OPENED[spec] = open_storage(spec)
    return _OPENED[spec]


def oriented(direction: str, signal_direction: str | None) -> float:
    """+1 when the signal improves the way its objective does, -1 when it runs the other way."""
    return 1.0 if signal_direction in (None, direction) else -1.0


def reason(step: int | None) -> str:
    """How a pruned trial is described wherever it is listed (the study, the records, the report)."""
    return f"pruned by the study's pruner at step {step}"


def record_step(record: dict[str, Any]) -> int | None:
    """The step a pruned trial's record says the pruner stopped it at (``run.pruned.step``)."""
    return ((record.get("run") or {}).get("pruned") or {}).get("step")


def pruned_steps(trials: Sequence[FrozenTrial]) -> dict[int, int | None]:
    """Trial number -> the step it was pruned at (its last reported step), for the pruned trials."""
    return {t.number: max(signal_values(t), default=None) for t in trials if t.state == TrialState.PRUNED}
