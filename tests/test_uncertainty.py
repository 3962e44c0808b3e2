"""Bootstrap intervals: hand-made cases, and brute force over every possible resample."""

from __future__ import annotations

import itertools

import pytest

from src import uncertainty as U


def _exact_quantiles(values, weights=None, baseline=None, level=0.95):
    """Every one of the n**n equally likely resamples, enumerated: the bootstrap distribution itself."""
    n = len(values)
    stats = []
    for idx in itertools.product(range(n), repeat=n):
        s = U._statistic(values, weights, list(idx))
        if baseline is not None:
            s -= U._statistic(baseline, weights, list(idx))
        stats.append(s)
    stats.sort()
    tail = (1 - level) / 2
    return U._quantile(stats, tail), U._quantile(stats, 1 - tail)


def test_constant_values_have_a_zero_width_interval():
    assert U.interval([0.3] * 7) == pytest.approx((0.3, 0.3))


@pytest.mark.parametrize(("values", "weights"), [
    ([0.1, 0.5, 0.9, 0.2, 0.4], None),
    ([0.0, 1.0, 0.0, 0.0, 1.0], None),
    ([2.0, 3.5, 1.0, 4.0, 2.5], [3, 10, 1, 7, 2]),   # a token-weighted mean, as the eval loss
])
def test_intervals_match_the_enumerated_bootstrap_distribution(values, weights):
    lo, hi = U.interval(values, weights, resamples=20000)
    exact_lo, exact_hi = _exact_quantiles(values, weights)
    spread = max(values) - min(values)
    assert lo == pytest.approx(exact_lo, abs=0.03 * spread)
    assert hi == pytest.approx(exact_hi, abs=0.03 * spread)


def test_paired_interval_matches_the_enumerated_distribution_and_cancels_shared_difficulty():
    trained = [0.9, 0.2, 0.6, 0.4, 0.8]
    untuned = [0.7, 0.1, 0.5, 0.2, 0.75]   # every example better by 0.05 to 0.2
    lo, hi = U.interval(trained, baseline=untuned, resamples=20000)
    exact = _exact_quantiles(trained, baseline=untuned)
    assert (lo, hi) == pytest.approx(exact, abs=0.01)
    assert lo > 0  # each example improved: the paired interval excludes zero
    # Unpaired, the examples' own spread (0.2 to 0.9) would swamp the difference.
    assert U.interval(trained)[0] < U.interval(untuned)[1]
    # A constant shift is known exactly when paired.
    assert U.interval(trained, baseline=[v - 0.1 for v in trained]) == pytest.approx((0.1, 0.1))


def test_intervals_are_seeded_and_contain_the_point_estimate():
    values = [0.1, 0.7, 0.3, 0.9, 0.5, 0.2, 0.6]
    assert U.interval(values, seed=3) == U.interval(values, seed=3)
    assert U.interval(values, seed=3) != U.interval(values, seed=4)
    lo, hi = U.interval(values)
    assert lo < sum(values) / len(values) < hi


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no per-example values"):
        U.interval([])
    with pytest.raises(ValueError, match="3 values against 2 baseline"):
        U.interval([1, 2, 3], baseline=[1, 2])


def test_record_intervals_cover_each_metric_and_paired_gains_by_example_id():
    rows = [{"id": "a", "eval/rougeL": 0.5, "eval/loss": 2.0, "eval/loss_tokens": 4},
            {"id": "b", "eval/rougeL": 0.3, "eval/loss": 3.0, "eval/loss_tokens": 1},
            {"id": "c", "eval/rougeL": 0.4, "eval/loss": 2.5, "eval/loss_tokens": 2}]
    base = [{"id": "c", "eval/rougeL": 0.3, "eval/loss": 3.0, "eval/loss_tokens": 2},  # other order
            {"id": "a", "eval/rougeL": 0.4, "eval/loss": 2.5, "eval/loss_tokens": 4},
            {"id": "b", "eval/rougeL": 0.2, "eval/loss": 3.5, "eval/loss_tokens": 1}]
    out = U.record_intervals(rows, base)
    assert set(out) == {"eval/rougeL", "eval/loss", "gain/rougeL", "gain/loss"}
    assert out["gain/rougeL"] == pytest.approx([0.1, 0.1])      # every example +0.1, matched by id
    assert out["gain/loss"] == pytest.approx([-0.5, -0.5])
    lo, hi = out["eval/loss"]
    assert 2.0 <= lo <= (2.0 * 4 + 3.0 + 2.5 * 2) / 7 <= hi <= 3.0
    assert U.record_intervals(rows, None).keys() == {"eval/rougeL", "eval/loss"}  # no baseline: no gains
    assert U.record_intervals(rows, base[:2]).keys() == {"eval/rougeL", "eval/loss"}  # unmatched: unpaired only
