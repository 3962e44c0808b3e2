"""Pure multi-objective arithmetic: the Pareto set, a knee point and the hypervolume.

Every function takes plain value vectors and one direction per objective ("maximize" or
"minimize"), in any number of objectives, and flips the maximized ones internally so the
algorithms only ever minimize. No I/O, no Optuna study: tested against brute force directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Vector = Sequence[float]


def _signs(directions: Sequence[str]) -> list[float]:
    signs = []
    for d in directions:
        if d not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {d!r}")
        signs.append(-1.0 if d == "maximize" else 1.0)
    return signs


def as_minimized(points: Sequence[Vector], directions: Sequence[str]) -> list[tuple[float, ...]]:
    """The points with maximized objectives negated, so that smaller is better everywhere."""
    signs = _signs(directions)
    out = []
    for p in points:
        if len(p) != len(signs):
            raise ValueError(f"a point has {len(p)} values for {len(signs)} objectives")
        if any(math.isnan(v) for v in p):
            raise ValueError(f"a point has a NaN value: {tuple(p)}")
        out.append(tuple(s * v for s, v in zip(signs, p, strict=True)))
    return out


def dominates(a: Vector, b: Vector) -> bool:
    """Whether ``a`` dominates ``b`` when every objective is minimized."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_indices(points: Sequence[Vector], directions: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates, ascending. Exact ties are all kept.

    Sort-filter-skyline: after a lexicographic sort, a point can only be dominated by one that comes
    before it, and if it is dominated at all, it is dominated by a point already on the front, so each
    point is compared with the front so far rather than with every other point.
    """
    mins = as_minimized(points, directions)
    order = sorted(range(len(mins)), key=lambda i: mins[i])
    front: list[int] = []
    for i in order:
        if not any(dominates(mins[j], mins[i]) for j in front):
            front.append(i)
    return sorted(front)


def knee_index(points: Sequence[Vector], directions: Sequence[str]) -> tuple[int, str]:
    """The knee of a Pareto front (the points given), and the method used, in words.

    Each objective is min-max normalised over the front (so units do not matter). With two
    objectives the knee is the point farthest from the straight line joining the two extreme points
    (where the trade-off bends most); with more, or when the extremes coincide, it is the point
    nearest to the ideal point (the best value of every objective at once). Ties go to the earlier
    point.
    """
    if not points:
        raise ValueError("the front is empty: there is no knee")
    mins = as_minimized(points, directions)
    dims = len(directions)
    lo = [min(p[k] for p in mins) for k in range(dims)]
    hi = [max(p[k] for p in mins) for k in range(dims)]
    norm = [tuple(0.0 if hi[k] == lo[k] else (p[k] - lo[k]) / (hi[k] - lo[k]) for k in range(dims)) for p in mins]
    if len(points) == 1:
        return 0, "the only point on the front"
    if dims == 2:
        a = min(range(len(norm)), key=lambda i: (norm[i][0], norm[i][1]))  # best in the first objective
        b = min(range(len(norm)), key=lambda i: (norm[i][1], norm[i][0]))  # best in the second
        (ax, ay), (bx, by) = norm[a], norm[b]
        length = math.hypot(bx - ax, by - ay)
        if length > 0:
            # Distance below the chord from a to b; points on the chord's far side count as negative.
            def below(i: int) -> float:
                x, y = norm[i]
                return ((bx - ax) * (ay - y) - (by - ay) * (ax - x)) / length

            best = max(range(len(norm)), key=lambda i: (below(i), -i))
            return best, ("maximum distance below the line joining the two extreme points of the front, "
                          "objectives min-max normalised over the front")
    best = min(range(len(norm)), key=lambda i: (math.fsum(v * v for v in norm[i]), i))
    return best, "nearest to the ideal point, objectives min-max normalised over the front"


def reference_point(points: Sequence[Vector], directions: Sequence[str], margin: float = 0.1) -> list[float]:
    """A hypervolume reference point (in the original directions): the worst value of each objective
    over ``points``, pushed ``margin`` of the objective's range further, so extreme points count."""
    if not points:
        raise ValueError("no points: no reference point")
    signs = _signs(directions)
    mins = as_minimized(points, directions)
    ref = []
    for k, s in enumerate(signs):
        worst, best = max(p[k] for p in mins), min(p[k] for p in mins)
        span = (worst - best) or abs(worst) or 1.0
        ref.append(s * (worst + margin * span))
    return ref


def hypervolume(points: Sequence[Vector], directions: Sequence[str], reference: Vector) -> float:
    """The volume dominated by ``points`` and bounded by ``reference`` (points beyond it count 0)."""
    import numpy as np

    # Optuna's WFG implementation (the one its hypervolume history plot uses); it is a private
    # module, pinned with optuna in pyproject.toml and exercised by the tests.
    from optuna._hypervolume import compute_hypervolume

    mins = np.asarray(as_minimized(points, directions), dtype=float).reshape(-1, len(directions))
    ref = np.asarray(as_minimized([reference], directions)[0], dtype=float)
    inside = mins[np.all(mins < ref, axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(compute_hypervolume(inside, ref))


def hypervolume_history(points: Sequence[Vector], directions: Sequence[str], reference: Vector) -> list[float]:
    """The hypervolume of the first 1, 2, ... points: how fast a search approached its front."""
    out: list[float] = []
    front: list[Vector] = []
    for p in points:
        candidates = [*front, p]
        front = [candidates[i] for i in pareto_indices(candidates, directions)]
        out.append(hypervolume(front, directions, reference))
    return out
