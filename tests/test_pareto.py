"""The pure multi-objective functions, checked against brute force and hand-worked examples."""

from __future__ import annotations

import itertools
import random

import pytest

from analysis import constraints, pareto
from src import metrics as M


def brute_force_front(points, directions):
    """The definition, literally: i is on the front when no j is at least as good everywhere and
    better somewhere."""
    sign = [1 if d == "minimize" else -1 for d in directions]

    def better_or_equal(a, b):
        return all(s * x <= s * y for s, x, y in zip(sign, a, b, strict=True))

    def strictly_better(a, b):
        return any(s * x < s * y for s, x, y in zip(sign, a, b, strict=True))

    return [i for i, p in enumerate(points)
            if not any(better_or_equal(q, p) and strictly_better(q, p) for j, q in enumerate(points) if j != i)]


@pytest.mark.parametrize("seed", range(40))
def test_front_equals_brute_force_on_random_sets(seed):
    rng = random.Random(seed)
    dims = rng.choice([1, 2, 3, 4])
    directions = [rng.choice(["maximize", "minimize"]) for _ in range(dims)]
    n = rng.randint(1, 60)
    # Small integer grids give many ties and exact duplicates; floats give general position.
    if seed % 2:
        points = [[rng.randint(0, 4) for _ in range(dims)] for _ in range(n)]
    else:
        points = [[rng.uniform(-5, 5) for _ in range(dims)] for _ in range(n)]
    assert pareto.pareto_indices(points, directions) == brute_force_front(points, directions)


@pytest.mark.parametrize(("points", "directions", "front"), [
    ([], ["maximize", "minimize"], []),
    ([[0.2, 100]], ["maximize", "minimize"], [0]),
    # quality up, seconds down: 1 dominates 0; 2 and 3 trade off; 4 is an exact duplicate of 2.
    ([[0.1, 100], [0.2, 90], [0.3, 200], [0.25, 150], [0.3, 200]], ["maximize", "minimize"], [1, 2, 3, 4]),
    # equal in one objective, better in the other: the worse one is dominated
    ([[0.3, 100], [0.3, 120]], ["maximize", "minimize"], [0]),
    # both minimised, three objectives, one point dominated in all
    ([[1, 2, 3], [3, 2, 1], [2, 3, 4], [2, 2, 2]], ["minimize"] * 3, [0, 1, 3]),
])
def test_hand_made_fronts(points, directions, front):
    assert pareto.pareto_indices(points, directions) == front == brute_force_front(points, directions)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="direction"):
        pareto.pareto_indices([[1]], ["up"])
    with pytest.raises(ValueError, match="2 values for 3 objectives"):
        pareto.pareto_indices([[1, 2]], ["minimize"] * 3)
    with pytest.raises(ValueError, match="NaN"):
        pareto.pareto_indices([[float("nan"), 1]], ["minimize"] * 2)
    with pytest.raises(ValueError, match="empty"):
        pareto.knee_index([], ["minimize"])


def test_knee_is_where_the_trade_off_bends():
    # quality (max) vs seconds (min): a front with a clear elbow at (0.30, 100)
    front = [[0.10, 10], [0.30, 100], [0.32, 300], [0.33, 900]]
    index, method = pareto.knee_index(front, ["maximize", "minimize"])
    assert index == 1 and "line joining the two extreme points" in method
    # units do not matter: the same front in milliseconds has the same knee
    assert pareto.knee_index([[q, s * 1000] for q, s in front], ["maximize", "minimize"])[0] == 1
    assert pareto.knee_index([[0.2, 5]], ["maximize", "minimize"]) == (0, "the only point on the front")
    # three objectives: nearest to the ideal point after normalisation
    index, method = pareto.knee_index([[0, 10, 10], [10, 0, 10], [4, 4, 4]], ["minimize"] * 3)
    assert index == 2 and "ideal point" in method


def test_hypervolume_against_hand_computed_areas():
    # minimise both, reference (4, 4): the staircase of (1,3), (2,2), (3,1) covers 3 + 2 + 1 = 6
    pts = [[1, 3], [2, 2], [3, 1]]
    assert pareto.hypervolume(pts, ["minimize", "minimize"], [4, 4]) == pytest.approx(6.0)
    # maximising the first objective: the same shape mirrored
    mirrored = [[-x, y] for x, y in pts]
    assert pareto.hypervolume(mirrored, ["maximize", "minimize"], [-4, 4]) == pytest.approx(6.0)
    # points at or beyond the reference add nothing; dominated points add nothing
    assert pareto.hypervolume([*pts, [5, 0], [3, 3]], ["minimize", "minimize"], [4, 4]) == pytest.approx(6.0)
    assert pareto.hypervolume([[5, 5]], ["minimize", "minimize"], [4, 4]) == 0.0
    # three objectives: a single point is a box
    assert pareto.hypervolume([[1, 1, 1]], ["minimize"] * 3, [3, 2, 4]) == pytest.approx(2 * 1 * 3)


def test_hypervolume_history_never_decreases_and_ends_at_the_whole_set():
    rng = random.Random(7)
    directions = ["maximize", "minimize"]
    points = [[rng.uniform(0, 1), rng.uniform(10, 100)] for _ in range(25)]
    ref = pareto.reference_point(points, directions)
    history = pareto.hypervolume_history(points, directions, ref)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(history))
    assert history[-1] == pytest.approx(pareto.hypervolume(points, directions, ref))
    # the reference is beyond the worst point of every objective, so every point counts
    assert ref[0] < min(p[0] for p in points) and ref[1] > max(p[1] for p in points)


@pytest.mark.parametrize(("text", "metric", "op", "value", "from_baseline"), [
    ("cost/peak_rss_mb <= 8000", "cost/peak_rss_mb", "<=", 8000.0, False),
    ("eval/rougeL >= baseline + 0.02", "eval/rougeL", ">=", 0.02, True),
    ("eval/loss<baseline-0.1", "eval/loss", "<", -0.1, True),
    ("eval/rougeL > baseline", "eval/rougeL", ">", 0.0, True),
    ("cost/usd < 1e-2", "cost/usd", "<", 0.01, False),
])
def test_constraints_parse(text, metric, op, value, from_baseline):
    c = constraints.parse(text)
    assert (c.metric, c.op, c.from_baseline) == (metric, op, from_baseline)
    assert c.value == pytest.approx(value)


@pytest.mark.parametrize(("text", "fragment"), [
    ("rougeL >= 0.2", "unknown metric 'rougeL'"),
    ("eval/rougeL = 0.2", "write METRIC OP VALUE"),
    ("cost/usd <= cheap", "must be a number or 'baseline"),
    ("cost/usd <= baseline", "only quality metrics have an untuned baseline"),
    ("eval/rougeL >= 1.2.3", "is not a number"),
])
def test_bad_constraints_name_the_fix(text, fragment):
    with pytest.raises(constraints.ConstraintError, match="constraint '") as info:
        constraints.parse(text)
    assert fragment in str(info.value)


def test_constraints_check_against_the_trials_own_baseline():
    c = constraints.parse("eval/rougeL >= baseline + 0.02")
    assert c.check({M.EVAL_ROUGE[2]: 0.15}, {"baseline/rougeL": 0.12}) is None
    assert "needs >= 0.16" in c.check({M.EVAL_ROUGE[2]: 0.15}, {"baseline/rougeL": 0.14})
    assert c.check({}, {"baseline/rougeL": 0.1}) == "eval/rougeL was not measured"
    assert c.check({M.EVAL_ROUGE[2]: 0.15}, {}) == "no untuned baseline for eval/rougeL"
    floor = constraints.quality_floor([("eval/rougeL", "maximize"), ("cost/train_s", "minimize"),
                                       ("eval/loss", "minimize")])
    assert [(f.metric, f.op) for f in floor] == [("eval/rougeL", ">="), ("eval/loss", "<=")]
