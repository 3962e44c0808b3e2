"""User constraints on trials: ``eval/rougeL >= baseline + 0.02``, ``cost/peak_rss_mb <= 8000``.

The right-hand side is a number, or ``baseline`` (the untuned model's score on the same eval
examples, from the trial's own record) plus or minus a number. Parsed once, with errors that name
the constraint and the fix, before any report is built.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from src import metrics as M

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}
_PATTERN = re.compile(r"^\s*(?P<metric>[\w./-]+)\s*(?P<op>>=|<=|>|<)\s*(?P<rhs>.+?)\s*$")
_RHS = re.compile(r"^(?:(?P<base>baseline)\s*(?:(?P<sign>[+-])\s*(?P<delta>[0-9.eE+-]+))?|(?P<number>[-+0-9.eE]+))$")


class ConstraintError(ValueError):
    pass


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str
    value: float             # the number, or the offset from the baseline
    from_baseline: bool
    text: str

    def bound(self, baseline: Mapping[str, float]) -> float | None:
        """The threshold for one trial (None when it needs a baseline the trial does not have)."""
        if not self.from_baseline:
            return self.value
        base = baseline.get(M.baseline_name(self.metric))
        return None if base is None else base + self.value

    def check(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> str | None:
        """None when satisfied, else why not (in words, with the numbers)."""
        value, bound = metrics.get(self.metric), self.bound(baseline)
        if value is None:
            return f"{self.metric} was not measured"
        if bound is None:
            return f"no untuned baseline for {self.metric}"
        if not _OPS[self.op](value, bound):
            return f"{self.metric} = {value:.4g}, needs {self.op} {bound:.4g} ({self.text})"
        return None


def parse(text: str, known: set[str] | frozenset[str] = M.ALL) -> Constraint:
    match = _PATTERN.match(text)
    if not match:
        raise ConstraintError(f"constraint '{text}': write METRIC OP VALUE, e.g. 'cost/peak_rss_mb <= 8000' or "
                              "'eval/rougeL >= baseline + 0.02' (OP: >=, <=, >, <)")
    metric, op, rhs = match["metric"], match["op"], match["rhs"]
    if metric not in known:
        raise ConstraintError(f"constraint '{text}': unknown metric '{metric}'; use one of {sorted(known)}")
    value = _RHS.match(rhs)
    if not value:
        raise ConstraintError(f"constraint '{text}': the right side must be a number or 'baseline [+|- number]'")
    if value["number"] is not None:
        try:
            return Constraint(metric, op, float(value["number"]), False, text.strip())
        except ValueError:
            raise ConstraintError(f"constraint '{text}': '{rhs}' is not a number") from None
    if metric not in M.QUALITY:
        raise ConstraintError(f"constraint '{text}': only quality metrics have an untuned baseline "
                              f"({', '.join(M.QUALITY)}); give a number instead")
    try:
        delta = float(value["delta"]) if value["delta"] else 0.0
    except ValueError:
        raise ConstraintError(f"constraint '{text}': '{value['delta']}' is not a number") from None
    return Constraint(metric, op, -delta if value["sign"] == "-" else delta, True, text.strip())


def quality_floor(objectives: list[tuple[str, str]]) -> list[Constraint]:
    """The default: every quality objective at least as good as the untuned model's score."""
    out = []
    for name, direction in objectives:
        if name in M.QUALITY:
            op = ">=" if direction == "maximize" else "<="
            out.append(Constraint(name, op, 0.0, True, f"{name} {op} baseline (untuned model)"))
    return out
