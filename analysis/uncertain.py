"""Which configurations the data can tell apart (pure functions, no I/O).

Quality objectives are compared pairwise on the eval examples both configurations were scored on: a
paired bootstrap of the per-example differences (repeats over seeds pooled by averaging each
example's value over a configuration's repeats). Cost objectives have no per-example values; two
configurations differ on one when their relative difference exceeds ``cost_tolerance``, with
repeats their ranges do not overlap, and neither was measured on a busy machine. A configuration
is dominated only when another is at least as good on every objective and better beyond this
uncertainty on at least one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from src import metrics as M
from src.uncertainty import interval

# Relative difference below which two wall-clock costs count as the same: the same trial has run 30%
# slower minutes later on a shared machine, so single measurements closer than this prove nothing.
COST_TOLERANCE = 0.10


@dataclass
class Candidate:
    """One configuration as the comparison sees it."""
    label: str
    values: list[float]                                  # point value of each objective, declared order
    per_example: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> example id -> value
    weights: dict[str, float] = field(default_factory=dict)   # example id -> eval loss tokens
    repeats: list[list[float]] = field(default_factory=list)  # each repeat's objective values
    busy: bool = False          # some repeat's costs were measured while other processes used the machine


def pooled(runs: Sequence[Sequence[dict]]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-example rows of a configuration's repeats (one list per run), averaged per example id over
    the runs that scored it; and each example's loss weight."""
    sums: dict[str, dict[str, list[float]]] = {}
    weights: dict[str, float] = {}
    for rows in runs:
        for row in rows:
            for name in M.QUALITY:
                if isinstance(row.get(name), int | float) and math.isfinite(row[name]):
                    sums.setdefault(name, {}).setdefault(str(row["id"]), []).append(float(row[name]))
            if isinstance(row.get(M.EVAL_LOSS_TOKENS), int | float):
                weights[str(row["id"])] = float(row[M.EVAL_LOSS_TOKENS])
    return {n: {i: sum(v) / len(v) for i, v in by_id.items()} for n, by_id in sums.items()}, weights


@dataclass
class Difference:
    """a minus b on one objective (in the objective's own sign), and whether it is beyond the noise."""
    objective: str
    diff: float
    low: float | None
    high: float | None
    n: int                      # shared eval examples (0 for costs)
    a_better: bool              # confidently better, in the objective's direction
    b_better: bool


def compare(a: Candidate, b: Candidate, objectives: Sequence[tuple[str, str]], tolerance: float = 0.0,
            cost_tolerance: float = COST_TOLERANCE, seed: int = 0) -> list[Difference]:
    """a against b on every objective. ``tolerance``: a quality difference smaller than this never
    counts, however narrow its interval."""
    out = []
    for k, (name, direction) in enumerate(objectives):
        sign = 1.0 if direction == "maximize" else -1.0
        diff = a.values[k] - b.values[k]
        pa, pb = a.per_example.get(name), b.per_example.get(name)
        shared = sorted(set(pa) & set(pb)) if pa and pb else []
        if pa and pb and shared:
            w = [a.weights.get(i, 1.0) for i in shared] if name == M.EVAL_LOSS else None
            lo, hi = interval([pa[i] for i in shared], w, seed, baseline=[pb[i] for i in shared])
            a_better = sign * lo > tolerance if sign > 0 else sign * hi > tolerance
            b_better = sign * hi < -tolerance if sign > 0 else sign * lo < -tolerance
            out.append(Difference(name, diff, lo, hi, len(shared), a_better, b_better))
            continue
        scale = max(abs(a.values[k]), abs(b.values[k]), 1e-12)
        beyond = abs(diff) / scale > cost_tolerance
        ra = [r[k] for r in a.repeats] or [a.values[k]]
        rb = [r[k] for r in b.repeats] or [b.values[k]]
        apart = max(ra) < min(rb) or max(rb) < min(ra) or (len(ra) == 1 and len(rb) == 1)
        # A cost measured while other processes used the machine says little about the configuration.
        better = beyond and apart and not (a.busy or b.busy)
        out.append(Difference(name, diff, None, None, 0, better and sign * diff > 0, better and sign * diff < 0))
    return out


def dominates(diffs: Sequence[Difference], directions: Sequence[str]) -> bool:
    """Whether a (the first of the compared pair) dominates b: at least as good on every objective
    (point values) and confidently better on one."""
    pairs = zip(diffs, directions, strict=True)
    at_least = all((d.diff >= 0) if dr == "maximize" else (d.diff <= 0) for d, dr in pairs)
    return at_least and any(d.a_better for d in diffs)


def _flipped(d: Difference) -> Difference:
    """b against a, from a against b: the same resampled examples, so the interval is exactly mirrored."""
    return Difference(d.objective, -d.diff, None if d.high is None else -d.high, None if d.low is None else -d.low,
                      d.n, d.b_better, d.a_better)


class Comparisons:
    """Every pair of candidates compared once, read both ways: the front, the ties, the
    recommendation and the separation sentence all ask about the same pairs, and each quality
    comparison is a bootstrap."""

    def __init__(self, cands: Sequence[Candidate], objectives: Sequence[tuple[str, str]], tolerance: float = 0.0,
                 cost_tolerance: float = COST_TOLERANCE) -> None:
        self.cands, self.objectives = list(cands), list(objectives)
        self.directions = [d for _, d in objectives]
        self.tolerance, self.cost_tolerance = tolerance, cost_tolerance
        self._memo: dict[tuple[int, int], list[Difference]] = {}

    def __len__(self) -> int:
        return len(self.cands)

    def __call__(self, i: int, j: int) -> list[Difference]:
        """Candidate i against candidate j on every objective."""
        if i > j:
            return [_flipped(d) for d in self(j, i)]
        if (i, j) not in self._memo:
            self._memo[i, j] = compare(self.cands[i], self.cands[j], self.objectives, self.tolerance,
                                       self.cost_tolerance)
        return self._memo[i, j]


def front(table: Comparisons, among: Sequence[int] | None = None) -> list[int]:
    """Indices of the candidates (of ``among``, default all) that no other of them dominates beyond
    the noise, ascending."""
    idx = sorted(range(len(table)) if among is None else among)
    return [i for i in idx if not any(dominates(table(j, i), table.directions) for j in idx if j != i)]


def indistinguishable(table: Comparisons, among: Sequence[int] | None = None) -> list[list[int]]:
    """Groups (connected through pairs) of candidates (of ``among``, default all) that no objective
    tells apart, each of 2 or more, as candidate indices in the order of ``among``."""
    idx = list(range(len(table)) if among is None else among)
    parent = {i: i for i in idx}

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, i in enumerate(idx):
        for j in idx[a + 1:]:
            if not any(d.a_better or d.b_better for d in table(i, j)):
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in idx:
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def not_worse_than_best(table: Comparisons, k: int) -> tuple[int, list[int]]:
    """The best candidate on objective k (point value), and the indices of every candidate not
    confidently worse than it there (the best included), ascending."""
    sign = 1.0 if table.directions[k] == "maximize" else -1.0
    cands = table.cands
    best = max(range(len(cands)), key=lambda i: (sign * cands[i].values[k], -i))
    return best, [i for i in range(len(cands)) if i == best or not table(i, best)[k].b_better]


def examples_to_separate(diff: Difference) -> int | None:
    """About how many shared eval examples would make an interval this wide, around a difference
    this large, exclude zero (the width shrinks with the square root of the count)."""
    if diff.low is None or diff.high is None or diff.n == 0 or diff.diff == 0:
        return None
    half = (diff.high - diff.low) / 2
    return max(diff.n + 1, math.ceil(diff.n * (half / abs(diff.diff)) ** 2))
