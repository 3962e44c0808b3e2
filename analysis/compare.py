"""Two studies' fronts on one plot: two machines, or before and after a change."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from analysis import figures, pareto
from analysis.report import machine
from analysis.summary import Group, Summary
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


def _trial_time(s: Summary) -> tuple[float, int]:
    """Seconds all finished trials took together, and how many finished trials have no time."""
    done = [r for r in s.data.rows if r.status in ("completed", "pruned", "failed")]
    return sum(r.seconds or 0.0 for r in done), sum(1 for r in done if r.seconds is None)


def _best(s: Summary) -> Group | None:
    quality, direction = s.quality
    groups = [g for g in s.groups if quality in g.mean]
    sign = -1.0 if direction == "maximize" else 1.0
    return min(groups, key=lambda g: (sign * g.mean[quality], g.numbers[0])) if groups else None


def _shared_hypervolumes(a: Summary, b: Summary) -> tuple[float, float, list[float]] | None:
    """Both studies' hypervolume against one reference point (the worst of either study's completed
    trials, as the report's): each study's own report uses its own, so theirs cannot be compared."""
    if a.data.objectives != b.data.objectives:
        return None
    directions = a.directions
    points = {tag: [r.values for r in s.data.completed if r.values] for tag, s in (("a", a), ("b", b))}
    if not points["a"] or not points["b"]:
        return None
    reference = pareto.reference_point(points["a"] + points["b"], directions)
    return (pareto.hypervolume(points["a"], directions, reference),
            pareto.hypervolume(points["b"], directions, reference), reference)


def side_by_side(a: Summary, b: Summary) -> list[str]:
    """The two searches as numbers: what they cost in trial time, the best quality each found (with
    its 95% interval over the eval examples) and the hypervolume of each front on a shared reference."""
    quality = a.quality[0]
    out = ["## Side by side", "", f"| | A: {a.data.name} | B: {b.data.name} |", "|---|---|---|"]
    counts = []
    for s in (a, b):
        by: dict[str, int] = {}
        for r in s.data.rows:
            by[r.status] = by.get(r.status, 0) + 1
        counts.append(f"{len(s.data.rows)} (" + ", ".join(f"{n} {k}" for k, n in sorted(by.items())) + ")")
    out.append(f"| trials | {counts[0]} | {counts[1]} |")
    (ta, missing_a), (tb, missing_b) = _trial_time(a), _trial_time(b)
    ratio = f" ({tb / ta:.2f}x A)" if ta > 0 else ""
    out.append(f"| total trial time | {ta:.0f} s | {tb:.0f} s{ratio} |")
    best = [_best(a), _best(b)]
    cells = []
    for g in best:
        if g is None:
            cells.append("none completed")
            continue
        low_high = g.intervals.get(quality)
        ci = f" [{low_high[0]:.4g}, {low_high[1]:.4g}]" if low_high else ""
        cells.append(f"{g.mean[quality]:.4g}{ci} (trial {g.label})")
    out.append(f"| best {quality} (95% interval) | {cells[0]} | {cells[1]} |")
    hv = _shared_hypervolumes(a, b)
    if hv is not None:
        out.append(f"| hypervolume, shared reference | {hv[0]:.4g} | {hv[1]:.4g} |")
    out.append("")
    if missing_a or missing_b:
        out.append(f"Trials with no recorded time, counted as 0 s: A {missing_a}, B {missing_b}.")
    if best[0] is not None and best[1] is not None and quality in best[0].intervals:
        low, high = best[0].intervals[quality]
        inside = low <= best[1].mean[quality] <= high
        out.append(f"B's best {quality} is {'inside' if inside else 'outside'} the 95% interval of A's best.")
    if hv is not None:
        out.append("Hypervolume reference point (the worst of either study's completed trials, pushed out by "
                   f"a tenth of the range): {', '.join(f'{v:.4g}' for v in hv[2])}.")
    else:
        out.append("No shared hypervolume: the studies declare different objectives or one has no completed trial.")
    out.append("Trial time: each trial's worker wall time (its result.json), or its start to its end in the "
               "study where it has no record.")
    return [*out, ""]


def markdown(a: Summary, b: Summary) -> str:
    quality, cost = a.quality[0], a.cost
    out = [f"# {a.data.name} vs {b.data.name}", "", *side_by_side(a, b)]
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
