"""A front that claims only what the data shows: hand-made cases, ties, repeats, and brute force
against the plain Pareto set when there is no noise at all."""

from __future__ import annotations

import itertools
import random

import pytest

from analysis import pareto
from analysis import uncertain as U

OBJ = [("eval/rougeL", "maximize"), ("cost/train_s", "minimize")]


def _cand(label, rouge_by_id, cost, repeats=None):
    mean = sum(rouge_by_id.values()) / len(rouge_by_id)
    return U.Candidate(label, [mean, cost], {"eval/rougeL": dict(rouge_by_id)}, {}, repeats or [])


def _noisy(base, shift, seed, n=20, spread=0.15):
    """Per-example scores: a shared difficulty per example, plus this configuration's shift and noise."""
    rng = random.Random(seed)
    return {str(i): base[i] + shift + rng.gauss(0, spread) for i in range(n)}


BASE = [random.Random(99).uniform(0.1, 0.5) for _ in range(20)]


def test_differences_within_the_noise_do_not_dominate():
    """The issue's case: r=8, 16, 32 differ by 0.01-0.03 ROUGE-L on 20 examples with per-example noise
    of 0.15, and by noise in train seconds: none may push another off the front."""
    a = _cand("r8", _noisy(BASE, 0.02, 1), 60.0)
    b = _cand("r16", _noisy(BASE, 0.00, 2), 58.0)
    c = _cand("r32", _noisy(BASE, -0.01, 3), 63.0)
    assert U.front(U.Comparisons([a, b, c], OBJ)) == [0, 1, 2]
    assert U.indistinguishable(U.Comparisons([a, b, c], OBJ)) == [[0, 1, 2]]


def test_a_clear_quality_gain_at_the_same_cost_dominates():
    a = _cand("good", {k: v + 0.2 for k, v in _noisy(BASE, 0, 1, spread=0.01).items()}, 60.0)
    b = _cand("worse", _noisy(BASE, 0, 2, spread=0.01), 61.0)
    diffs = U.compare(a, b, OBJ)
    assert diffs[0].a_better and diffs[0].low > 0.15 and diffs[0].n == 20
    assert not diffs[1].a_better and not diffs[1].b_better  # 61 vs 60 s: within the cost tolerance
    assert U.dominates(diffs, ["maximize", "minimize"])
    assert U.front(U.Comparisons([a, b], OBJ)) == [0]


def test_a_clearly_cheaper_equal_quality_configuration_dominates_and_repeats_must_not_overlap():
    same = _noisy(BASE, 0, 1, spread=0.01)
    cheap = _cand("cheap", same, 30.0, repeats=[[0, 29.0], [0, 31.0]])
    dear = _cand("dear", same, 60.0, repeats=[[0, 58.0], [0, 62.0]])
    assert U.front(U.Comparisons([cheap, dear], OBJ)) == [0]
    # the same means but overlapping repeat ranges: not shown to differ
    wobbly = _cand("wobbly", same, 60.0, repeats=[[0, 25.0], [0, 95.0]])
    assert U.front(U.Comparisons([cheap, wobbly], OBJ)) == [0, 1]


def test_costs_measured_on_a_busy_machine_prove_nothing():
    same = _noisy(BASE, 0, 1, spread=0.01)
    quiet = _cand("quiet", same, 54.4)
    busy = _cand("busy", same, 70.9)
    assert U.front(U.Comparisons([quiet, busy], OBJ)) == [0]
    busy.busy = True
    assert U.front(U.Comparisons([quiet, busy], OBJ)) == [0, 1]


def test_user_tolerance_ignores_real_but_small_quality_differences():
    a = _cand("a", {k: v + 0.01 for k, v in _noisy(BASE, 0, 1, spread=0.0).items()}, 60.0)
    b = _cand("b", _noisy(BASE, 0, 1, spread=0.0), 60.0)
    assert U.front(U.Comparisons([a, b], OBJ)) == [0]                      # +0.01 on every example: certain
    assert U.front(U.Comparisons([a, b], OBJ, tolerance=0.02)) == [0, 1]   # but below what the user cares about


def test_loss_is_compared_token_weighted_and_minimized():
    ids = [str(i) for i in range(10)]
    a = U.Candidate("a", [2.0], {"eval/loss": {i: 2.0 for i in ids}}, {i: 5.0 for i in ids})
    b = U.Candidate("b", [2.5], {"eval/loss": {i: 2.5 for i in ids}}, {i: 5.0 for i in ids})
    [d] = U.compare(a, b, [("eval/loss", "minimize")])
    assert d.a_better and not d.b_better and d.low == pytest.approx(-0.5) == d.high


def test_repeats_are_pooled_per_example():
    runs = [[{"id": "x", "eval/rougeL": 0.2, "eval/loss": 1.0, "eval/loss_tokens": 3},
             {"id": "y", "eval/rougeL": 0.4}],
            [{"id": "x", "eval/rougeL": 0.4, "eval/loss": 2.0, "eval/loss_tokens": 3}]]
    per_example, weights = U.pooled(runs)
    assert per_example["eval/rougeL"] == {"x": pytest.approx(0.3), "y": 0.4}
    assert per_example["eval/loss"] == {"x": 1.5} and weights == {"x": 3.0}


def test_cheapest_not_confidently_worse_than_the_best():
    best = _cand("best", _noisy(BASE, 0.03, 1), 90.0)
    tied = _cand("tied", _noisy(BASE, 0.0, 2), 40.0)
    bad = _cand("bad", {k: v - 0.3 for k, v in _noisy(BASE, 0, 3, spread=0.01).items()}, 10.0)
    top, keep = U.not_worse_than_best(U.Comparisons([best, tied, bad], OBJ), 0)
    assert top == 0 and keep == [0, 1]


def test_examples_needed_to_separate_grows_as_the_difference_shrinks():
    wide = U.Difference("eval/rougeL", 0.01, -0.03, 0.05, 20, False, False)
    narrow = U.Difference("eval/rougeL", 0.04, -0.0, 0.08, 20, False, False)
    assert U.examples_to_separate(wide) == 320       # 20 * (0.04 / 0.01) ** 2
    assert U.examples_to_separate(narrow) == 21      # just past the edge: one more example
    assert U.examples_to_separate(U.Difference("cost/train_s", 1, None, None, 0, False, False)) is None


@pytest.mark.parametrize("seed", range(5))
def test_without_noise_the_front_is_the_plain_pareto_set(seed):
    """Brute force: per-example values that are a configuration's constant (every interval has zero
    width) and costs far apart, so every point difference is certain: the plain Pareto set."""
    rng = random.Random(seed)
    cands, points = [], []
    for i in range(7):
        quality = round(rng.uniform(0, 1), 2)
        cost = rng.choice([10.0, 20.0, 40.0, 80.0, 160.0])
        cands.append(U.Candidate(str(i), [quality, cost], {"eval/rougeL": {str(e): quality for e in range(5)}}))
        points.append([quality, cost])
    assert U.front(U.Comparisons(cands, OBJ)) == pareto.pareto_indices(points, ["maximize", "minimize"])
    # and nothing is indistinguishable unless equal on both
    for group in U.indistinguishable(U.Comparisons(cands, OBJ)):
        for i, j in itertools.combinations(group, 2):
            assert points[i] == points[j]


def test_report_on_records_with_per_example_scores_declares_the_tie(tmp_path, capsys):
    """The issue's sweep: r=8, 16, 32 within the noise on 20 examples, r=8's train seconds inflated by
    a busy machine. The report keeps all three on the front, says they cannot be told apart and how
    many examples would, and recommends the cheapest that is not confidently worse than the best."""
    import json

    from analysis.__main__ import main
    from tests.report_study import record

    for number, (r, shift, train_s) in enumerate([(8, 0.02, 70.9), (16, 0.0, 54.4), (32, -0.01, 58.0)]):
        tdir = tmp_path / str(number)
        tdir.mkdir()
        scores = _noisy(BASE, shift, number)
        rouge = sum(scores.values()) / len(scores)
        rec = record(number, "completed", (r, 0.001, "none"), rouge, train_s, None, tdir)
        rec["artifacts"] = {"per_example": "per_example.jsonl"}
        rec["cost_info"] = {"interference": {"busy": r == 8}}  # r=8 trained while the machine was busy
        (tdir / "result.json").write_text(json.dumps(rec))
        (tdir / "per_example.jsonl").write_text("".join(
            json.dumps({"id": i, "eval/rougeL": v}) + "\n" for i, v in scores.items()))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path), "--out", str(out), "--no-png"]) == 0
    md = (out / "report.md").read_text()
    front = md[md.index("## Pareto front"):]
    assert all(f"| #{n} |" in front for n in range(3)), front
    tie = next(line for line in md.splitlines() if line.startswith("Cannot be told apart: "))
    assert sorted(tie.split(": ")[1].split(" (")[0].split(", ")) == ["#0", "#1", "#2"]
    assert "The data cannot tell" in md and "shared eval examples" in md
    assert "not confidently worse" in md and "**cheapest**: trial #1" in md
    capsys.readouterr()


def test_each_pair_is_compared_once_and_read_both_ways():
    rng = random.Random(3)
    a = _cand("a", {str(i): rng.random() for i in range(15)}, cost=10.0, repeats=[[0.5, 10.0], [0.5, 12.5]])
    b = _cand("b", {str(i): rng.random() for i in range(15)}, cost=14.0, repeats=[[0.5, 13.0], [0.5, 15.0]])
    table = U.Comparisons([a, b], OBJ)
    for mirrored, direct in zip(table(1, 0), U.compare(b, a, OBJ), strict=True):
        assert mirrored.diff == pytest.approx(direct.diff) and mirrored.n == direct.n
        assert (mirrored.a_better, mirrored.b_better) == (direct.a_better, direct.b_better)
        if direct.low is not None:
            assert (mirrored.low, mirrored.high) == pytest.approx((direct.low, direct.high))
    assert list(table._memo) == [(0, 1)]  # computed once, for both directions


def test_report_cells_and_scatter_carry_each_configurations_interval(tmp_path):
    """A single trial shows its recorded interval; repeats merged show mean ± sd and the interval of
    their per-example means; the scatter's quality error bars are those intervals (asymmetric)."""
    import json

    from analysis import figures, report
    from analysis.summary import summarize
    from analysis.trials import from_records
    from tests.report_study import record

    for number, (r, shift) in enumerate([(8, 0.0), (16, 0.03), (16, 0.01)]):  # r=16 ran twice
        tdir = tmp_path / str(number)
        tdir.mkdir()
        scores = _noisy(BASE, shift, number)
        rec = record(number, "completed", (r, 0.001, "none"), sum(scores.values()) / len(scores), 60.0, None, tdir)
        rec["artifacts"] = {"per_example": "per_example.jsonl"}
        rec["intervals"] = {"eval/rougeL": [0.1, 0.9]}  # what the trial recorded (made up: it is shown as is)
        (tdir / "result.json").write_text(json.dumps(rec))
        (tdir / "per_example.jsonl").write_text("".join(
            json.dumps({"id": i, "eval/rougeL": v}) + "\n" for i, v in scores.items()))
    s = summarize(from_records([tmp_path]), [])
    single = next(g for g in s.groups if len(g.rows) == 1)
    double = next(g for g in s.groups if len(g.rows) == 2)
    assert single.intervals["eval/rougeL"] == (0.1, 0.9)
    lo, hi = double.intervals["eval/rougeL"]
    assert lo < double.mean["eval/rougeL"] < hi and hi - lo < 0.5
    assert report._group_cell(single, "eval/rougeL") == f"{single.mean['eval/rougeL']:.4g} [0.1, 0.9]"
    cell = report._group_cell(double, "eval/rougeL")
    assert " ± " in cell and cell.endswith(f"[{lo:.3g}, {hi:.3g}]")
    assert report._group_cell(double, "cost/train_s") == "60 ± 0"  # costs: no interval over examples
    bars = [t.error_y for t in figures.scatter(s).data if t.error_y is not None and t.error_y.array is not None]
    shown = {round(m, 6) for b in bars for m in b.arrayminus}
    assert round(double.mean["eval/rougeL"] - lo, 6) in shown and all(b.symmetric is False for b in bars)
