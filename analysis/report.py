"""Write a Summary out: report.html (self-contained, plotly's JS embedded), report.md, trials.csv,
PNG figures, and the recommended configurations as runnable config files.
"""

from __future__ import annotations

import csv
import html
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis import configs, figures, uncertain
from analysis.summary import Group, Summary
from analysis.trials import describe_unreadable, metric_names

log = logging.getLogger("paretune.analysis")
PNG_SCALE = 1


@dataclass
class Written:
    html: Path
    markdown: Path
    csv: Path
    pngs: list[Path]
    configs: dict[str, tuple[Path, str]]   # recommendation kind -> (config file, command running it)
    png_error: str | None = None


def machine(s: Summary) -> list[str]:
    """What the study ran on, from its records (one line per distinct machine)."""
    seen: dict[str, str] = {}
    for r in s.data.rows:
        cpu = (r.record or {}).get("cpu") or {}
        if not cpu:
            continue
        flags = ", ".join(k for k, v in (cpu.get("flags") or {}).items() if v) or "none of interest"
        line = (f"{cpu.get('model', 'unknown CPU')}; {cpu.get('logical_cpus', '?')} logical CPUs, "
                f"{cpu.get('usable_cores', '?')} usable, {cpu.get('numa_nodes', '?')} NUMA node(s); flags: {flags}")
        seen.setdefault(line, line)
    return list(seen) or ["unknown (no trial record)"]


def versions(s: Summary) -> list[str]:
    """Package versions of the trials, one line per distinct set."""
    seen: dict[str, str] = {}
    for r in s.data.rows:
        packages = ((r.record or {}).get("environment") or {}).get("packages") or {}
        if packages:
            line = ", ".join(f"{k} {v}" for k, v in packages.items())
            seen.setdefault(line, line)
    return list(seen) or ["unknown (no trial record)"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _group_cell(g: Group, name: str) -> str:
    """The value (mean ± standard deviation over repeats), and a quality metric's 95% interval over
    the eval examples."""
    if name not in g.mean:
        return "-"
    text = f"{g.mean[name]:.4g} ± {g.std[name]:.2g}" if len(g.rows) > 1 else f"{g.mean[name]:.4g}"
    if name in g.intervals:
        lo, hi = g.intervals[name]
        text += f" [{lo:.3g}, {hi:.3g}]"
    return text


def _status_counts(s: Summary) -> str:
    counts: dict[str, int] = {}
    for r in s.data.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def markdown(s: Summary, written_configs: dict[str, tuple[Path, str]], files: list[str]) -> str:
    out = [f"# Pareto report: {s.data.name}", ""]
    out += [f"- Source: {s.data.source}", f"- Trials: {len(s.data.rows)} ({_status_counts(s)}); "
            f"{len(s.groups)} distinct completed configuration(s)"]
    models = [((r.record or {}).get("run") or {}).get("model") or {} for r in s.data.rows]
    synthetic = sorted({str(m.get("name")) for m in models if "synthetic" in m})
    if synthetic:  # random weights: what they say about quality would be noise, and none was measured
        out.append(f"- Models: **synthetic: speed and memory only** ({', '.join(synthetic)}: random weights in a "
                   "public model's shape; no quality was measured, so no quality front is drawn)")
    if s.data.unreadable:  # a record cut short by a crash must not vanish from the count unnoticed
        out.append(f"- Unreadable records, left out: {describe_unreadable(s.data.unreadable)}")
    out.append("- Objectives: " + ", ".join(f"{n} ({d})" for n, d in s.data.objectives))
    out.append("- Constraints: " + ("; ".join(c.text for c in s.constraints) or "none"))
    out += ["- Machine: " + m for m in machine(s)]
    out += ["- Packages: " + v for v in versions(s)]
    out += ["", "## Recommendation", ""]
    if not s.recommendations:
        out.append("Nothing to recommend: " + ("; ".join(s.notes) or "no completed trial") + ".")
    for rec in s.recommendations:
        g = rec.group
        shown = ", ".join(f"{n} = {_group_cell(g, n)}" for n in dict.fromkeys([*s.objective_names, s.cost]))
        out += [f"**{rec.kind}**: trial {g.label} ({shown}). {rec.why[0].upper()}{rec.why[1:]}.", "",
                "```bash", configs.command(g.overrides)]
        if rec.kind in written_configs:
            out.append(written_configs[rec.kind][1])
        out += ["```", ""]
    if s.recommendations and s.notes:
        out += [f"Note: {note}." for note in s.notes] + [""]
    names = s.objective_names
    rule = ("A configuration is left off only when another is at least as good on every objective and better "
            "beyond the noise on one: quality by a paired bootstrap over the shared eval examples (95%), costs "
            f"by more than {uncertain.COST_TOLERANCE:.0%} with non-overlapping repeats, never on a cost measured "
            "while other processes used the machine. "
            if s.uncertainty_aware else "").rstrip()
    out += ["## Pareto front", "", f"Feasible, non-dominated configurations over {', '.join(names)} "
            "(value, or mean ± sample standard deviation where a configuration ran more than once, then "
            "[95% interval over the eval examples] for quality; repeats' per-example scores averaged). "
            f"{rule}".rstrip(), ""]
    header = ["trial", *names, "params"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in s.front:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in g.params.items())
        out.append("| " + " | ".join([g.label, *(_group_cell(g, n) for n in names), params]) + " |")
    for tie in s.ties:
        out += ["", f"Cannot be told apart: {', '.join(g.label for g in tie)} (no objective differs beyond the noise)."]
    if s.separation:
        out += ["", s.separation]
    infeasible = [g for g in s.groups if not g.feasible]
    if infeasible:
        out += ["", "## Left out by the constraints", ""]
        out += [f"- trial {g.label}: {'; '.join(g.violations)}" for g in infeasible]
    unfinished = [r for r in s.data.rows if r.status != "completed"]
    if unfinished:
        out += ["", "## Trials that did not complete", ""]
        out += [f"- trial #{r.number} {r.status}: {r.error or 'no reason recorded'}" for r in unfinished]
    out += ["", "## Search", ""]
    if s.hypervolume:
        final = s.hypervolume[-1][1]
        reached = next((n for n, v in s.hypervolume if final and v >= 0.99 * final), None)
        out.append(f"- Hypervolume after the last trial: {final:.4g} (99% of it reached at trial #{reached}); "
                   f"reference point {', '.join(f'{v:.4g}' for v in s.hv_reference or [])}")
    out.append(f"- Parameter importance: {s.importance_note}")
    for objective, scores in s.importance.items():
        out.append(f"  - {objective}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    out += ["", "## Files", ""] + [f"- {f}" for f in files]
    return "\n".join(out) + "\n"


def write_csv(s: Summary, path: Path) -> None:
    params = sorted({k for r in s.data.rows for k in r.params})
    metrics = metric_names(s.data)
    front = {n for g in s.front for n in g.numbers}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", "status", "on_front", *params, *metrics, "error", "command"])
        for r in s.data.rows:
            w.writerow([r.number, r.status, r.number in front, *(r.params.get(k, "") for k in params),
                        *(_fmt(r.metrics[m]) if m in r.metrics else "" for m in metrics),
                        r.error or "", configs.command(r.overrides)])


def _trials_table(s: Summary) -> str:
    metrics = [m for m in metric_names(s.data) if m in (*s.objective_names, s.cost, s.quality[0])]
    metrics += [m for m in ("cost/peak_rss_mb", "cost/usd") if m not in metrics]
    front = {n for g in s.front for n in g.numbers}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["trial", "status", "front", "params", *metrics, "error"])
    body = []
    for r in s.data.rows:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in r.params.items())
        cells = [str(r.number), r.status, "yes" if r.number in front else "", params,
                 *(_fmt(r.metrics[m]) if m in r.metrics else "" for m in metrics), r.error or ""]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _markdown_to_html(text: str) -> str:
    """The summary rendered as a page (headings, tables, code blocks) by markdown-it-py, CommonMark
    with GitHub's tables. Raw HTML in the text is escaped, not passed through: trial errors and
    overrides are user text."""
    from markdown_it import MarkdownIt

    return "<div class='summary'>" + MarkdownIt("commonmark", {"html": False}).enable("table").render(text) + "</div>"


def write_html(s: Summary, figs: dict[str, Any], summary_md: str, path: Path) -> None:
    parts = []
    for i, (name, fig) in enumerate(figs.items()):
        # The first figure carries plotly.js inline, so the file renders with no network at all.
        parts.append(f"<section id='{name}'>" + fig.to_html(full_html=False, include_plotlyjs=(i == 0),
                                                            div_id=f"fig-{name}") + "</section>")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>paretune report: {html.escape(s.data.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}} pre{{white-space:pre-wrap;background:#f6f6f6;
padding:0.6em}} code{{background:#f6f6f6}}</style></head><body>
<h1>paretune report: {html.escape(s.data.name)}</h1>
{_markdown_to_html(summary_md)}
{''.join(parts)}
<h2>All trials</h2>
{_trials_table(s)}
</body></html>
"""
    path.write_text(page)


def write_pngs(figs: dict[str, Any], folder: Path) -> tuple[list[Path], str | None]:
    """PNG copies of the figures (plotly's kaleido, which drives a local Chromium)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    try:
        for name, fig in figs.items():
            path = folder / f"{name}.png"
            fig.write_image(str(path), scale=PNG_SCALE)
            out.append(path)
    except Exception as exc:  # noqa: BLE001 - a missing browser must not cost the rest of the report
        reason = (f"PNG figures not written ({type(exc).__name__}: {exc}); they need Chromium: "
                  "`apt-get install chromium` (make setup does it as root)")
        log.warning("%s", reason)
        return out, reason
    return out, None


def write(s: Summary, out_dir: Path, pngs: bool = True) -> Written:
    out_dir.mkdir(parents=True, exist_ok=True)
    written_configs: dict[str, tuple[Path, str]] = {}
    for rec in s.recommendations:
        header = (f"paretune: the '{rec.kind}' recommendation of study {s.data.name}, trial {rec.group.label}.\n"
                  f"Run it with: python -m src.train --config-dir {out_dir} +{configs.GROUP}={rec.kind}\n"
                  f"Same as: {configs.command(rec.group.overrides)}")
        written_configs[rec.kind] = configs.write(out_dir, rec.kind, rec.group.overrides, header)
    figs = figures.all_figures(s)
    png_paths, png_error = write_pngs(figs, out_dir / "figures") if pngs else ([], None)
    files = ["report.html", "report.md", "trials.csv",
             *(str(p.relative_to(out_dir)) for p in png_paths),
             *(str(p.relative_to(out_dir)) for p, _ in written_configs.values())]
    summary_md = markdown(s, written_configs, files)
    (out_dir / "report.md").write_text(summary_md)
    write_csv(s, out_dir / "trials.csv")
    write_html(s, figs, summary_md, out_dir / "report.html")
    return Written(out_dir / "report.html", out_dir / "report.md", out_dir / "trials.csv", png_paths,
                   written_configs, png_error)
