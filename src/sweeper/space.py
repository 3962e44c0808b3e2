"""Hydra sweep overrides -> an Optuna search space, with the meaning Hydra's own syntax has.

``a,b,c`` and ``choice(a,b,c)``: categorical. ``range(a,b[,step])``: Hydra's basic sweeper values
(``b`` excluded), an integer distribution when all are integers, else categorical over the values.
``interval(a,b)``: float; ``int(interval(a,b))``: integer; ``tag(log, ...)``: log scale. Anything
else is a fixed override passed to every trial unchanged.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from src.sweeper.study import StudyError

Choice = None | bool | int | float | str


@dataclass
class SearchSpace:
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)   # overrides every trial gets, as typed
    # Choices Optuna cannot store (lists, dicts) are searched as their override text, passed verbatim.
    verbatim: dict[str, set[str]] = field(default_factory=dict)

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """The command-line overrides of one trial: the fixed ones, then its sampled values."""
        return [*self.fixed, *(f"{k}={v if v in self.verbatim.get(k, ()) else format_value(v)}"
                               for k, v in params.items())]

    def grid(self) -> dict[str, list[Choice]]:
        """The space as a grid (for GridSampler); only finite dimensions have one."""
        out = {}
        for name, d in self.distributions.items():
            if isinstance(d, CategoricalDistribution):
                out[name] = list(d.choices)
            elif isinstance(d, IntDistribution) and not d.log:
                out[name] = list(range(d.low, d.high + 1, d.step))
            else:
                raise StudyError(f"hydra.sweeper.params.{name}: a grid needs finite values; "
                                 "use choice(...) or range(...) instead of interval(...)")
        return out

    def jobs(self) -> list[dict[str, Any]]:
        """Every parameter set of the grid, in the order of its keys' values."""
        return _product(self.grid())

    def extremes(self) -> list[dict[str, Any]]:
        """Parameter sets that touch every categorical value and both ends of every interval.

        Checking these before the first trial catches a bad value in any dimension without
        composing the whole product.
        """
        first = {k: _ends(d)[0] for k, d in self.distributions.items()}
        out = [first]
        for k, d in self.distributions.items():
            out += [{**first, k: v} for v in _ends(d)[1:]]
        return out

    def corners(self) -> list[dict[str, Any]]:
        """Every combination of the categorical values and the ends of every range: where a quantity that
        grows with each parameter (memory, with model size, rank, batch) is largest or smallest."""
        return _product({k: _ends(d) for k, d in self.distributions.items()})

    def corner_count(self) -> int:
        return math.prod(len(_ends(d)) for d in self.distributions.values())


def _product(values: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the keys' values, in the order of their lists."""
    return [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]


def _ends(d: BaseDistribution) -> list[Any]:
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    assert isinstance(d, IntDistribution | FloatDistribution)
    return [d.low, d.high] if d.high != d.low else [d.low]


def format_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back (strings with odd characters quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and any(c in value for c in " ,()[]{}='\":\\"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def _categorical(name: str, values: list[Any]) -> CategoricalDistribution:
    if not values:
        raise StudyError(f"hydra.sweeper.params.{name}: the choice is empty; give at least one value")
    return CategoricalDistribution(values)


def _choice(space: SearchSpace, key: str, o: Override, sweep: ChoiceSweep) -> CategoricalDistribution:
    texts = list(o.sweep_string_iterator())
    values = []
    for value, text in zip(sweep.list, texts, strict=True):
        if isinstance(value, None | bool | int | float | str):
            values.append(value)
        else:  # e.g. lora.target_modules=[q_proj],[q_proj,v_proj]
            space.verbatim.setdefault(key, set()).add(text)
            values.append(text)
    return _categorical(key, values)


def _range(name: str, sweep: RangeSweep) -> BaseDistribution:
    assert sweep.start is not None and sweep.stop is not None
    values = list(sweep.range())
    if not values:
        raise StudyError(f"hydra.sweeper.params.{name}: range({sweep.start}, {sweep.stop}, {sweep.step}) "
                         "is empty (the end is excluded); make the start lower than the end")
    if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
        return IntDistribution(int(values[0]), int(values[-1]), step=int(sweep.step))
    return _categorical(name, [float(v) for v in values])


def _interval(name: str, sweep: IntervalSweep) -> BaseDistribution:
    assert sweep.start is not None and sweep.end is not None
    log = "log" in sweep.tags
    if sweep.start > sweep.end:
        raise StudyError(f"hydra.sweeper.params.{name}: interval({sweep.start}, {sweep.end}) has low > high; "
                         "swap the bounds")
    if log and sweep.start <= 0:
        raise StudyError(f"hydra.sweeper.params.{name}: a log-scale interval needs a positive low bound, "
                         f"got {sweep.start}")
    if isinstance(sweep.start, int) and isinstance(sweep.end, int):
        return IntDistribution(sweep.start, sweep.end, log=log)
    return FloatDistribution(float(sweep.start), float(sweep.end), log=log)


def build(overrides: list[Override]) -> SearchSpace:
    """Split parsed overrides into a search space and fixed overrides (later keys win)."""
    space = SearchSpace()
    dists: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for o in overrides:
        key = o.get_key_element()
        dists.pop(key, None)
        fixed.pop(key, None)
        if not o.is_sweep_override():
            fixed[key] = str(o.input_line)
            continue
        value = o.value()
        if isinstance(value, ChoiceSweep):
            dists[key] = _choice(space, key, o, value)
        elif isinstance(value, RangeSweep):
            dists[key] = _range(key, value)
        elif isinstance(value, IntervalSweep):
            dists[key] = _interval(key, value)
        else:  # pragma: no cover - Hydra has no other sweep types
            raise StudyError(f"{key}: unsupported sweep {o.input_line}")
    space.distributions, space.fixed = dists, list(fixed.values())
    return space
