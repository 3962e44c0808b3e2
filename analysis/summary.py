"""From a study's trials to a decision: merged repeats, feasibility, the front, two recommendations,
hypervolume after each trial and parameter importance. Plain data; writing it out is report.py's job.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from analysis import pareto, uncertain
from analysis.constraints import Constraint
from analysis.trials import StudyData, TrialRow, per_example
from src import metrics as M
from src.uncertainty import interval


@dataclass
class Group:
    """One configuration: a trial, or the repeats of one setting merged (mean and spread)."""
    rows: list[TrialRow]
    values: list[float]                       # mean of each objective, declared order
    mean: dict[str, float]
    std: dict[str, float]                     # sample standard deviation (0 for a single trial)
    violations: list[str] = field(default_factory=list)
    # 95% interval of each quality metric over the eval examples: a single trial's own (its record),
    # or the repeats' per-example means resampled; empty when the records have no per-example scores.
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def numbers(self) -> list[int]:
        return [r.number for r in self.rows]

    @property
    def label(self) -> str:
        return "#" + ",".join(str(n) for n in self.numbers)

    @property
    def overrides(self) -> list[str]:
        return self.rows[0].overrides

    @property
    def params(self) -> dict[str, Any]:
        """The searched keys, for display: a key whose value differs between merged repeats (their
        seeds) shows every value, in trial order."""
        out = dict(self.rows[0].params)
        for k in out:
            seen = [r.params.get(k) for r in self.rows]
            if len({repr(v) for v in seen}) > 1:
                out[k] = ",".join(str(v) for v in seen)
        return out

    @property
    def baseline(self) -> dict[str, float]:
        return self.rows[0].baseline

    @property
    def feasible(self) -> bool:
        return not self.violations


@dataclass
class Recommendation:
    kind: str            # "knee" | "cheapest"
    group: Group
    why: str


@dataclass
class Summary:
    data: StudyData
    constraints: list[Constraint]
    groups: list[Group]
    front: list[Group]                        # feasible and non-dominated, by the first objective
    recommendations: list[Recommendation]
    quality: tuple[str, str]                  # (metric, direction) the tolerance is about
    cost: str                                 # the metric "cheapest" minimises
    tolerance: float
    hypervolume: list[tuple[int, float]]      # (trial number, hypervolume of the front so far)
    hv_reference: list[float] | None
    importance: dict[str, dict[str, float]]   # objective -> param -> importance
    importance_note: str | None
    notes: list[str] = field(default_factory=list)
    # Set when every feasible configuration kept per-example scores: the front and 'cheapest' then
    # claim only differences beyond the noise (analysis/uncertain.py).
    ties: list[list[Group]] = field(default_factory=list)    # front members no objective tells apart
    separation: str | None = None                            # what the data cannot decide, and what would
    uncertainty_aware: bool = False

    @property
    def directions(self) -> list[str]:
        return [d for _, d in self.data.objectives]

    @property
    def objective_names(self) -> list[str]:
        return [n for n, _ in self.data.objectives]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def merge(rows: list[TrialRow]) -> list[Group]:
    """Completed trials grouped by configuration, in the order their first trial ran."""
    by_key: dict[str, list[TrialRow]] = {}
    for row in rows:
        by_key.setdefault(row.config_key(), []).append(row)
    groups = []
    for members in by_key.values():
        names = sorted({k for r in members for k in r.metrics})
        mean, std = {}, {}
        for name in names:
            values = [r.metrics[name] for r in members if name in r.metrics and math.isfinite(r.metrics[name])]
            if values:
                mean[name], std[name] = _mean_std(values)
        n_obj = len(members[0].values or [])
        values = [statistics.fmean(r.values[k] for r in members if r.values) for k in range(n_obj)]
        groups.append(Group(members, values, mean, std))
    return groups


def check_choices(data: StudyData, quality: str | None, cost: str | None, tolerance: float) -> None:
    """Refuse a quality or cost metric no trial measured, and a tolerance that is negative or not a
    number: either would silently empty the scatter or drop the 'cheapest' recommendation."""
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"--tolerance must be a number >= 0 (how far below the best quality 'cheapest' may be), "
                         f"got {tolerance:g}")
    known = sorted({m for r in data.rows for m in r.metrics} | {n for n, _ in data.objectives})
    for flag, name in (("--quality", quality), ("--cost", cost)):
        if name is not None and name not in known:
            raise ValueError(f"{flag} '{name}': no trial of {data.name} measured it; use one of {known}")


def _pick_axes(data: StudyData, quality: str | None, cost: str | None) -> tuple[tuple[str, str], str]:
    objectives = dict(data.objectives)
    if quality is None:
        quality = next((n for n, _ in data.objectives if n in M.QUALITY), data.objectives[0][0])
    if cost is None:
        cost = next((n for n, d in data.objectives if n != quality and d == "minimize"), M.COST_TRAIN_S)
    direction = objectives.get(quality) or ("minimize" if quality == M.EVAL_LOSS else "maximize")
    return (quality, direction), cost


def _cheapest(feasible: list[Group], quality: tuple[str, str], cost: str, tolerance: float) -> Recommendation | None:
    name, direction = quality
    scored = [g for g in feasible if name in g.mean and cost in g.mean]
    if not scored:
        return None
    sign = 1.0 if direction == "maximize" else -1.0
    best = max(sign * g.mean[name] for g in scored)
    near = [g for g in scored if sign * g.mean[name] >= best - tolerance]
    pick = min(near, key=lambda g: (g.mean[cost], -sign * g.mean[name], g.numbers[0]))
    return Recommendation("cheapest", pick, (
        f"lowest {cost} among the feasible configurations whose {name} is within {tolerance:g} of the best "
        f"feasible value ({sign * best:.4g})"))


def _importance(data: StudyData) -> tuple[dict[str, dict[str, float]], str | None]:
    """Optuna's fANOVA importance of each searched param, for each objective.

    Computed on a study rebuilt from the rows (ranges spanning the values tried) whatever the source,
    so a report from the storage and one from the result.json files agree."""
    import optuna

    study = _study_from_rows(data)
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    varied = {k for t in completed for k in t.params if len({repr(u.params.get(k)) for u in completed}) > 1}
    if len(completed) < 2 or not varied:
        return {}, "not computed: it needs at least 2 completed trials that differ in a searched parameter"
    out: dict[str, dict[str, float]] = {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    for index, (name, _) in enumerate(data.objectives):
        def target(t: optuna.trial.FrozenTrial, i: int = index) -> float:
            return float(t.values[i])

        try:
            out[name] = dict(optuna.importance.get_param_importances(
                study, evaluator=evaluator, params=sorted(varied), target=target))
        except (RuntimeError, ValueError) as exc:  # e.g. params absent from some trials' spaces
            return {}, f"not computed: {exc}"
    return out, "fANOVA (optuna.importance.FanovaImportanceEvaluator, seed 0) over the completed trials"


def _study_from_rows(data: StudyData) -> Any:
    """An in-memory Optuna study of the records, so importance is computed the same way for both sources."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    rows = data.completed
    keys = sorted({k for r in rows for k in r.params})
    dists: dict[str, Any] = {}
    for k in keys:
        values: list[Any] = [r.params[k] for r in rows if k in r.params]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            dists[k] = IntDistribution(min(values), max(values))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            dists[k] = FloatDistribution(float(min(values)), float(max(values)))
        else:
            dists[k] = CategoricalDistribution(sorted({str(v) for v in values}))
    directions: list[Any] = [d for _, d in data.objectives]
    study = optuna.create_study(directions=directions)
    for r in rows:
        params = {k: (str(r.params[k]) if isinstance(dists[k], CategoricalDistribution) else r.params[k])
                  for k in keys if k in r.params}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  values=r.values))
    return study


def summarize(data: StudyData, constraints: list[Constraint], tolerance: float = 0.01,
              quality: str | None = None, cost: str | None = None) -> Summary:
    check_choices(data, quality, cost, tolerance)
    quality_axis, cost_metric = _pick_axes(data, quality, cost)
    groups = merge(data.completed)
    # each trial's per-example scores, read once: the intervals and the front both use them
    scores = [[per_example(r) for r in g.rows] for g in groups]
    for g, runs in zip(groups, scores, strict=True):
        g.intervals = _intervals(g, runs)
        g.violations = [v for c in constraints if (v := c.check(g.mean, g.baseline)) is not None]
    feasible = [g for g in groups if g.feasible]
    directions = [d for _, d in data.objectives]
    cands = _candidates([(g, runs) for g, runs in zip(groups, scores, strict=True) if g.feasible])
    table = uncertain.Comparisons(cands, data.objectives, tolerance) if cands is not None else None
    if table is not None:
        front = [feasible[i] for i in uncertain.front(table)]
    else:
        front = [feasible[i] for i in pareto.pareto_indices([g.values for g in feasible], directions)]
    front.sort(key=lambda g: (g.values[0] * (-1 if directions[0] == "maximize" else 1), g.numbers[0]))
    recs = []
    notes = []
    if front:
        k, method = pareto.knee_index([g.values for g in front], directions)
        recs.append(Recommendation("knee", front[k], f"knee of the front: {method}"))
    elif groups:
        notes.append("no completed configuration satisfies every constraint: nothing to recommend")
    ties: list[list[Group]] = []
    separation = None
    if table is not None and front:
        cheapest = _cheapest_not_worse(feasible, table, quality_axis, cost_metric, tolerance)
        at = {id(g): i for i, g in enumerate(feasible)}  # the front's groups as candidate indices
        on_front = [at[id(g)] for g in front]
        ties = [[feasible[i] for i in tie] for tie in uncertain.indistinguishable(table, on_front)]
        separation = _separation(feasible, table, on_front, quality_axis)
    else:
        cheapest = _cheapest(feasible, quality_axis, cost_metric, tolerance)
    if cheapest is not None:
        recs.append(cheapest)
    elif feasible:
        notes.append(f"no 'cheapest' recommendation: no feasible configuration measured both {quality_axis[0]} "
                     f"and {cost_metric}")

    completed = sorted(data.completed, key=lambda r: r.number)
    history: list[tuple[int, float]] = []
    reference = None
    if completed:
        reference = pareto.reference_point([r.values or [] for r in completed], directions)
        curve = pareto.hypervolume_history([r.values or [] for r in completed], directions, reference)
        history = list(zip([r.number for r in completed], curve, strict=True))
    importance, importance_note = _importance(data)
    return Summary(data, constraints, groups, front, recs, quality_axis, cost_metric, tolerance, history,
                   reference, importance, importance_note, notes, ties, separation, cands is not None)


def _intervals(g: Group, runs: list[list[dict[str, Any]]]) -> dict[str, tuple[float, float]]:
    """Each quality metric's 95% interval over the eval examples (see Group.intervals); ``runs``: the
    per-example scores of each of the group's trials."""
    if len(g.rows) == 1:
        recorded = (g.rows[0].record or {}).get("intervals") or {}
        return {n: (float(v[0]), float(v[1])) for n, v in recorded.items()
                if n in M.QUALITY and isinstance(v, list) and len(v) == 2}
    if not all(runs):
        return {}
    scores, weights = uncertain.pooled(runs)
    out = {}
    for name, by_id in scores.items():
        ids = sorted(by_id)
        w = [weights.get(i, 1.0) for i in ids] if name == M.EVAL_LOSS else None
        out[name] = interval([by_id[i] for i in ids], w)
    return out


def _candidates(groups: list[tuple[Group, list[list[dict[str, Any]]]]]) -> list[uncertain.Candidate] | None:
    """The groups with their per-example scores (repeats pooled), or None when some group has none
    (records from before per-example scores were kept): then the plain point-value front is drawn."""
    out = []
    for g, runs in groups:
        if not any(runs):
            return None
        scores, weights = uncertain.pooled([r for r in runs if r])
        repeats = [list(r.values) for r in g.rows if r.values] if len(g.rows) > 1 else []
        busy = any((((r.record or {}).get("cost_info") or {}).get("interference") or {}).get("busy") for r in g.rows)
        out.append(uncertain.Candidate(g.label, g.values, scores, weights, repeats, bool(busy)))
    return out


def _cheapest_not_worse(feasible: list[Group], table: uncertain.Comparisons, quality: tuple[str, str], cost: str,
                        tolerance: float) -> Recommendation | None:
    """The lowest-cost configuration whose quality is not confidently worse than the best one's."""
    names = [n for n, _ in table.objectives]
    if quality[0] not in names or not all(cost in g.mean for g in feasible):
        return _cheapest(feasible, quality, cost, tolerance)
    best, keep = uncertain.not_worse_than_best(table, names.index(quality[0]))
    pick = min((feasible[i] for i in keep), key=lambda g: (g.mean[cost], g.numbers[0]))
    return Recommendation("cheapest", pick, (
        f"lowest {cost} among the feasible configurations whose {quality[0]} is not confidently worse "
        f"(paired bootstrap over the shared eval examples, 95%, tolerance {tolerance:g}) than the best, "
        f"trial {feasible[best].label}"))


def _separation(feasible: list[Group], table: uncertain.Comparisons, on_front: list[int],
                quality: tuple[str, str]) -> str | None:
    """One sentence when the front's configurations cannot be told apart on the quality objective:
    the largest difference, its interval, and about how many eval examples would separate it."""
    names = [n for n, _ in table.objectives]
    if quality[0] not in names or len(on_front) < 2:
        return None
    k = names.index(quality[0])
    values = [table.cands[i].values[k] for i in on_front]
    pairs = [(a, b, table(on_front[a], on_front[b])[k]) for a in range(len(on_front)) for b in range(len(on_front))
             if a != b and values[a] > values[b]]
    undecided = [(i, j, d) for i, j, d in pairs if not (d.a_better or d.b_better) and d.low is not None]
    if not undecided:
        return None
    i, j, d = max(undecided, key=lambda p: abs(p[2].diff))
    front = [feasible[n] for n in on_front]
    labels = [front[n].label for n in sorted({n for a, b, _ in undecided for n in (a, b)})]
    need = uncertain.examples_to_separate(d)
    more = f"; about {need} shared eval examples (eval.num_examples, or repeats with other seeds) would" \
           f" separate a difference this large" if need else ""
    return (f"The data cannot tell {', '.join(labels)} apart on {quality[0]}: the largest "
            f"difference, {front[i].label} minus {front[j].label} = {d.diff:+.3g}, has a 95% interval of "
            f"[{d.low:+.3g}, {d.high:+.3g}] over {d.n} shared eval examples{more}.")
