"""The report's plotly figures, built from a Summary (no I/O here)."""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.summary import Group, Summary
from analysis.trials import TrialRow
from src import metrics as M

FRONT_COLOR, OTHER_COLOR, INFEASIBLE_COLOR = "#d62728", "#1f77b4", "#b0b0b0"
LAYOUT: dict[str, Any] = {"template": "plotly_white", "width": 900, "height": 560,
                          "font": {"size": 13}, "margin": {"l": 70, "r": 30, "t": 60, "b": 60}}


def hover(g: Group, s: Summary) -> str:
    lines = [f"<b>trial {html.escape(g.label)}</b>" + (f" ({len(g.rows)} runs, mean)" if len(g.rows) > 1 else "")]
    lines += [f"{html.escape(k)} = {html.escape(str(v))}" for k, v in g.params.items()]
    shown = [*s.objective_names, s.quality[0], s.cost, M.COST_PEAK_RSS_MB, M.COST_USD]
    for name in dict.fromkeys(shown):
        if name in g.mean:
            spread = f" ± {g.std[name]:.3g}" if len(g.rows) > 1 else ""
            ci = f" [{g.intervals[name][0]:.3g}, {g.intervals[name][1]:.3g}]" if name in g.intervals else ""
            lines.append(f"{html.escape(name)} = {g.mean[name]:.4g}{spread}{ci}")
    if g.violations:
        lines.append("infeasible: " + html.escape("; ".join(g.violations)))
    return "<br>".join(lines)


def _quality_bars(members: list[Any], quality: str) -> dict[str, Any]:
    """Error bars of the quality axis: each configuration's 95% interval over the eval examples
    (asymmetric), or the standard deviation over repeats where no interval was recorded."""
    if all(quality in g.intervals for g in members):
        return {"type": "data", "symmetric": False, "visible": True,
                "array": [max(0.0, g.intervals[quality][1] - g.mean[quality]) for g in members],
                "arrayminus": [max(0.0, g.mean[quality] - g.intervals[quality][0]) for g in members]}
    return {"type": "data", "array": [g.std.get(quality, 0.0) for g in members], "visible": True}


def scatter(s: Summary) -> go.Figure:
    """Quality against cost: every configuration, the front highlighted, the recommendations marked."""
    quality, cost = s.quality[0], s.cost
    on_front = {id(g) for g in s.front}
    fig = go.Figure()
    for name, color, members in (
        ("infeasible", INFEASIBLE_COLOR, [g for g in s.groups if not g.feasible]),
        ("feasible", OTHER_COLOR, [g for g in s.groups if g.feasible and id(g) not in on_front]),
        ("Pareto front", FRONT_COLOR, sorted(s.front, key=lambda g: g.mean.get(cost, 0.0))),
    ):
        members = [g for g in members if quality in g.mean and cost in g.mean]
        if not members:
            continue
        fig.add_trace(go.Scatter(
            x=[g.mean[cost] for g in members], y=[g.mean[quality] for g in members], name=name,
            mode="markers+lines" if name == "Pareto front" else "markers",
            marker={"size": 12 if name == "Pareto front" else 9, "color": color},
            line={"dash": "dot", "color": color},
            error_x={"type": "data", "array": [g.std.get(cost, 0.0) for g in members], "visible": True},
            error_y=_quality_bars(members, quality),
            text=[g.label for g in members], hovertext=[hover(g, s) for g in members], hoverinfo="text"))
    for rec, symbol in zip(s.recommendations, ("star", "diamond"), strict=False):
        g = rec.group
        if quality in g.mean and cost in g.mean:
            fig.add_trace(go.Scatter(x=[g.mean[cost]], y=[g.mean[quality]], name=f"recommended: {rec.kind}",
                                     mode="markers", hovertext=[hover(g, s)], hoverinfo="text",
                                     marker={"symbol": symbol, "size": 20, "color": "rgba(0,0,0,0)",
                                             "line": {"width": 2.5, "color": "black"}}))
    floors = {g.baseline.get(M.baseline_name(quality)) for g in s.groups if quality in M.QUALITY}
    floors.discard(None)
    if len(floors) == 1:  # the untuned model's score: the quality any fine-tuning has to beat
        fig.add_hline(y=floors.pop(), line_dash="dash", line_color="#555555",
                      annotation_text="untuned model", annotation_position="bottom right")
    fig.update_layout(**LAYOUT, title=f"{quality} against {cost}: study {s.data.name}",
                      xaxis_title=f"{cost} (lower is better)",
                      yaxis_title=f"{quality} ({'higher' if s.quality[1] == 'maximize' else 'lower'} is better)")
    return fig


def _dimension(label: str, values: list[Any]) -> dict[str, Any]:
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return {"label": label, "values": values}
    cats = sorted({str(v) for v in values})
    return {"label": label, "values": [cats.index(str(v)) for v in values],
            "tickvals": list(range(len(cats))), "ticktext": cats}


def parallel(s: Summary) -> go.Figure:
    """Searched params and objectives of every completed trial, coloured by quality."""
    rows = s.data.completed
    params = sorted({k for r in rows for k in r.params})
    dims = [_dimension(k, [r.params.get(k, "-") for r in rows]) for k in params]
    dims += [_dimension(n, [r.values[i] if r.values else 0.0 for r in rows])
             for i, n in enumerate(s.objective_names)]
    color = [r.metrics.get(s.quality[0], 0.0) for r in rows]
    fig = go.Figure(go.Parcoords(dimensions=dims, line={"color": color, "colorscale": "Viridis", "showscale": True,
                                                         "colorbar": {"title": s.quality[0]}}))
    fig.update_layout(**{**LAYOUT, "margin": {**LAYOUT["margin"], "t": 120}},
                      title="Parameters and objectives of every completed trial")
    return fig


def hypervolume(s: Summary) -> go.Figure:
    fig = go.Figure(go.Scatter(x=[n for n, _ in s.hypervolume], y=[v for _, v in s.hypervolume],
                               mode="lines+markers", name="hypervolume"))
    ref = ", ".join(f"{v:.4g}" for v in (s.hv_reference or []))
    fig.update_layout(**LAYOUT, title=f"Hypervolume of the front after each trial (reference point: {ref})",
                      xaxis_title="trial number", yaxis_title="hypervolume")
    return fig


def cost_breakdown(s: Summary) -> go.Figure:
    """Where each completed trial's time and money went: train, eval, and everything else."""
    rows: list[TrialRow] = sorted(s.data.completed, key=lambda r: r.number)
    labels = [f"#{r.number}" for r in rows]
    train = [r.metrics.get(M.COST_TRAIN_S, 0.0) for r in rows]
    evals = [r.metrics.get(M.COST_EVAL_S, 0.0) for r in rows]
    overhead = [max(0.0, r.metrics.get(M.COST_TOTAL_S, 0.0) - t - e)
                for r, t, e in zip(rows, train, evals, strict=True)]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("wall seconds", "USD", "energy (Wh)"))
    for name, values in (("train", train), ("eval", evals), ("overhead (start, load, save)", overhead)):
        fig.add_trace(go.Bar(x=labels, y=values, name=name), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=[r.metrics.get(M.COST_USD, 0.0) for r in rows], name="USD",
                         showlegend=False, marker_color="#2ca02c"), row=2, col=1)
    fig.add_trace(go.Bar(x=labels, y=[r.metrics.get(M.COST_ENERGY_WH, 0.0) for r in rows], name="Wh",
                         showlegend=False, marker_color="#ff7f0e"), row=3, col=1)
    fig.update_layout(**{**LAYOUT, "height": 720}, barmode="stack", title="Cost of each completed trial")
    return fig


def all_figures(s: Summary) -> dict[str, go.Figure]:
    return {"scatter": scatter(s), "parallel": parallel(s), "hypervolume": hypervolume(s),
            "cost": cost_breakdown(s)}
