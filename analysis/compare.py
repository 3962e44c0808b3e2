"""Two studies' fronts on one plot: two machines, or before and after a change."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from analysis import figures
from analysis.report import machine
from analysis.summary import Summary
from analysis.trials import describe_unreadable

COLORS = ("#d62728", "#1f77b4")


def figure(a: Summary, b: Summary) -> go.Figure:
    quality, cost = a.quality[0], a.cost
    fig = go.Figure()
    for s, color, tag in ((a, COLORS[0], "A"), (b, COLORS[1], "B")):
        groups = [g for g in s.groups if quality in g.mean and cost in g.mean]
        front = sorted((g for g in s.front if quality in g.mean and cost in g.mean), key=lambda g: g.mean[cost])
        fig.add_trace(go.Scatter(x=[g.mean[cost] for g in groups], y=[g.mean[quality] for g in groups],
                                 mode="markers", name=f"{tag}: {s.data.name} (all)", opacity=0.35,
                                 marker={"color": color, "size": 8},
                                 hovertext=[figures.hover(g, s) for g in groups], hoverinfo="text"))
        fig.add_trace(go.Scatter(x=[g.mean[cost] for g in front], y=[g.mean[quality] for g in front],
                                 mode="markers+lines", name=f"{tag}: {s.data.name} (front)",
                                 marker={"color": color, "size": 12}, line={"color": color},
                                 hovertext=[figures.hover(g, s) for g in front], hoverinfo="text"))
    fig.update_layout(**figures.LAYOUT, title=f"{quality} against {cost}: {a.data.name} vs {b.data.name}",
                      xaxis_title=f"{cost} (lower is better)", yaxis_title=quality)
    return fig


def check_comparable(a: Summary, b: Summary) -> None:
    if (a.quality[0], a.cost) != (b.quality[0], b.cost):
        raise ValueError(f"the studies plot different axes ({a.quality[0]} vs {a.cost}, {b.quality[0]} vs {b.cost}); "
                         "give both the same --quality and --cost")


def markdown(a: Summary, b: Summary) -> str:
    quality, cost = a.quality[0], a.cost
    out = [f"# {a.data.name} vs {b.data.name}", ""]
    for tag, s in (("A", a), ("B", b)):
        out += [f"## {tag}: {s.data.name}", "", f"- Source: {s.data.source}"]
        if s.data.unreadable:
            out.append(f"- Unreadable records, left out: {describe_unreadable(s.data.unreadable)}")
        out += [f"- Machine: {m}" for m in machine(s)]
        out += ["", f"| trial | {quality} | {cost} |", "|---|---|---|"]
        out += [f"| {g.label} | {g.mean.get(quality, float('nan')):.4g} | {g.mean.get(cost, float('nan')):.4g} |"
                for g in sorted(s.front, key=lambda g: g.mean.get(cost, 0.0))]
        out.append("")
    return "\n".join(out)


def write(a: Summary, b: Summary, out_dir: Path, png: bool = True) -> list[Path]:
    from analysis.report import write_pngs

    check_comparable(a, b)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = figure(a, b)
    html_path = out_dir / "compare.html"
    fig.write_html(str(html_path), include_plotlyjs=True, full_html=True)
    md_path = out_dir / "compare.md"
    md_path.write_text(markdown(a, b))
    pngs, _ = write_pngs({"compare": fig}, out_dir) if png else ([], None)
    return [html_path, md_path, *pngs]
