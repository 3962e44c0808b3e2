"""Knob-by-knob ratios: each setting's speed, memory and quality relative to a reference trial of the
same sweep (e.g. fp32 / system allocator / default threads), as a Markdown table.

Ratios, not absolute numbers, are what travel between machines; repeated measurements of one
setting are reduced to their median, and the table says how many there were.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from src import metrics as M
from src import overrides, results
from src.redact import scrub_text

DEFAULT_METRICS = (M.TRAIN_TOKENS_PER_S, M.COST_PEAK_RSS_MB, M.EVAL_ROUGE[2])
BEGIN, END = "<!-- ratios:begin -->", "<!-- ratios:end -->"


def markers(block: str | None = None) -> tuple[str, str]:
    """The pair of comments a table is written between; a named block lets one document hold several."""
    if block is None:
        return BEGIN, END
    return f"<!-- ratios:{block}:begin -->", f"<!-- ratios:{block}:end -->"


def read_records_with_files(paths: Iterable[Path]) -> tuple[list[tuple[dict[str, Any], Path]], list[tuple[str, str]]]:
    """Completed trial records, each with its result.json, from those files or the sweep folders holding
    them, and (path, why) of each record that could not be read (cut short, not JSON, wrong shape)."""
    from analysis.trials import read_record

    out, unreadable = [], []
    for path in paths:
        if not path.exists():
            raise ValueError(f"{path} does not exist; give sweep folders or result.json files")
        files = results.record_files(path)
        for f in files:
            record, why = read_record(f)
            if record is None:
                unreadable.append((str(f), why or "unreadable"))
            elif record.get("status") == "completed":
                out.append((record, f))
    return out, unreadable


def read_records(paths: Iterable[Path]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Completed trial records (see read_records_with_files) and the unreadable ones."""
    found, unreadable = read_records_with_files(paths)
    return [record for record, _ in found], unreadable


def load_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Completed trial records from result.json files or the sweep folders holding them."""
    return read_records(paths)[0]


def setting(record: dict[str, Any], keys: Sequence[str]) -> tuple[str, ...]:
    """The trial's value of each key, as its command line gave it ("default" when not overridden)."""
    given = overrides.texts((record.get("trial") or {}).get("overrides", []))
    return tuple(scrub_text(given.get(k, "default")) for k in keys)  # a storage URL key keeps no password


def table(records: list[dict[str, Any]], keys: Sequence[str], reference: dict[str, str],
          metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    """Markdown: one row per setting, each metric's median and its ratio to the reference setting."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(setting(r, keys), []).append(r)
    ref_key = tuple(reference.get(k, "default") for k in keys)
    if ref_key not in groups:
        raise ValueError(f"no completed trial has the reference setting {dict(zip(keys, ref_key, strict=True))}; "
                         f"settings found: {sorted(groups)}")

    def median(rows: list[dict[str, Any]], m: str) -> float | None:
        values = [r["metrics"][m] for r in rows if m in (r.get("metrics") or {})]
        return statistics.median(values) if values else None

    def interval(rows: list[dict[str, Any]], m: str) -> str:
        """A single trial's own 95% interval over its eval examples (record `intervals`), where it has one."""
        low_high = (rows[0].get("intervals") or {}).get(m) if len(rows) == 1 else None
        return f" [{low_high[0]:.4g}, {low_high[1]:.4g}]" if low_high else ""

    ref = {m: median(groups[ref_key], m) for m in metrics}
    header = [*keys, "n", *(f"{m} (x ref)" for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(groups, key=lambda k: (k != ref_key, k)):
        cells = []
        for m in metrics:
            value, base = median(groups[key], m), ref[m]
            cells.append("-" if value is None or not base
                         else f"{value:.4g}{interval(groups[key], m)} ({value / base:.2f}x)")
        lines.append("| " + " | ".join([*key, str(len(groups[key])), *cells]) + " |")
    return "\n".join(lines)


def check_block(text: str, block: str | None = None) -> None:
    """The document has the (named) ratio markers; else a ValueError that names the blocks it has."""
    begin, end = markers(block)
    if begin not in text or end not in text:
        found = sorted(set(re.findall(r"<!-- ratios:([\w-]+):begin -->", text)))
        raise ValueError(f"the document has no {begin} ... {end} markers to write the table between"
                         + (f" (its named blocks: {', '.join(found)})" if found else ""))


def replace_block(text: str, table_text: str, block: str | None = None) -> str:
    """Put ``table_text`` between the (named) ratio markers of a document, keeping everything else."""
    check_block(text, block)
    begin, end = markers(block)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table_text}\n{end}{tail}"
