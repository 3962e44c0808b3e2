"""Bootstrap intervals for eval metrics, from each eval example's own values (pure functions).

A metric's value over the eval set is a mean over examples (the eval loss: a mean over reference
tokens, i.e. a ratio of per-example sums). Resampling the examples with replacement and recomputing
that mean gives its sampling spread: the 2.5th and 97.5th percentiles of the resampled values are the
95% percentile-bootstrap interval. A gain over the untuned model is paired: the same resampled examples
are used for the trained and the untuned model, so what the examples have in common (an easy
dialogue, a long reference) cancels out. Seeded, so a record's intervals are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from src import metrics as M

if TYPE_CHECKING:
    import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _quantile(sorted_values: Sequence[float] | np.ndarray, q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def _statistic(values: Sequence[float], weights: Sequence[float] | None, idx: Sequence[int]) -> float:
    """The (weighted) mean of the values at ``idx``: one resample's statistic (for checking by hand)."""
    if weights is None:
        return sum(values[i] for i in idx) / len(idx)
    total = sum(weights[i] for i in idx)
    return sum(values[i] * weights[i] for i in idx) / total


def interval(values: Sequence[float], weights: Sequence[float] | None = None, seed: int = 0,
             resamples: int = RESAMPLES, level: float = LEVEL,
             baseline: Sequence[float] | None = None) -> tuple[float, float]:
    """Percentile-bootstrap interval of the (weighted) mean of ``values``; with ``baseline`` (the same
    examples' values for another model), of the paired difference values - baseline. Vectorised:
    a report compares every pair of configurations, each comparison thousands of resamples."""
    import numpy as np

    n = len(values)
    if n == 0:
        raise ValueError("no per-example values to resample")
    if baseline is not None and len(baseline) != n:
        raise ValueError(f"paired interval: {n} values against {len(baseline)} baseline values")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    v = np.asarray(values, dtype=float)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if baseline is not None:
        v = v - np.asarray(baseline, dtype=float)  # the same weights on both sides: the mean is linear
    stats = np.sort((v[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1))
    tail = (1 - level) / 2
    return _quantile(stats, tail), _quantile(stats, 1 - tail)


def record_intervals(rows: list[dict[str, float]], baseline_rows: list[dict[str, float]] | None,
                     seed: int = 0) -> dict[str, list[float]]:
    """95% intervals of every quality metric present in ``rows`` (one dict per eval example, as in
    per_example.jsonl) and, where the untuned model's rows for the same examples are given, of each
    gain (paired). Keys are the metric and gain names; values [low, high]."""
    out: dict[str, list[float]] = {}
    base_by_id = {r["id"]: r for r in baseline_rows or []}
    for name in M.QUALITY:
        if not rows or any(name not in r for r in rows):
            continue
        values = [float(r[name]) for r in rows]
        weights = [float(r[M.EVAL_LOSS_TOKENS]) for r in rows] if name == M.EVAL_LOSS else None
        out[name] = list(interval(values, weights, seed))
        paired = [base_by_id[r["id"]][name] for r in rows if name in base_by_id.get(r["id"], {})]
        if baseline_rows and len(paired) == len(rows):
            out[M.gain_name(name)] = list(interval(values, weights, seed, baseline=[float(v) for v in paired]))
    return out
