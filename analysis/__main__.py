"""``python -m analysis <command>``: turn a study into a decision a team can act on.

    python -m analysis report --study NAME [--storage URL] [SWEEP_DIR...] [--constraint 'M >= X']...
    python -m analysis compare STUDY_OR_DIR_A STUDY_OR_DIR_B [--storage URL]
    python -m analysis ratios SWEEP_DIR... --keys cpu.allocator cpu.threads quant \\
        --reference cpu.allocator=system cpu.threads=2 quant=none [--readme README.md [--block NAME]]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from analysis import ratios
from src.config import PROJECT_ROOT

DEFAULT_STORAGE = os.environ.get("PARETUNE_STUDY_STORAGE", str(PROJECT_ROOT / "studies" / "paretune.journal"))


def _summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="journal file or postgresql:// URL "
                        "(default: $PARETUNE_STUDY_STORAGE or studies/paretune.journal)")
    p.add_argument("--constraint", action="append", default=[], metavar="'METRIC OP VALUE'",
                   help="keep only trials that satisfy it, e.g. 'cost/peak_rss_mb <= 8000' or "
                        "'eval/rougeL >= baseline + 0.02' (repeatable)")
    p.add_argument("--no-quality-floor", action="store_true",
                   help="do not require quality objectives to beat the untuned model (the default floor)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="'cheapest' picks the lowest cost within this much quality of the best (default 0.01)")
    p.add_argument("--quality", help="the quality metric of the scatter and the tolerance (default: first "
                                     "quality objective)")
    p.add_argument("--cost", help="the cost metric 'cheapest' minimises (default: first other minimised objective)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG figures (they need Chromium)")


def _load(source: str | None, paths: list[Path], storage: str):  # type: ignore[no-untyped-def]
    from analysis import trials

    if paths:
        return trials.from_records(paths, source)
    if source is None:
        raise ValueError("give --study NAME (read from --storage) or sweep folders / result.json files")
    if Path(source).exists():
        return trials.from_records([Path(source)])
    return trials.from_storage(source, storage)


def _summarize(data, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from analysis import constraints
    from analysis.summary import summarize
    from src import metrics as M

    # The project's metric names, and whatever else the trials measured (e.g. a newer metric).
    known = frozenset(M.ALL | {m for r in data.rows for m in r.metrics} | {n for n, _ in data.objectives})
    given = [constraints.parse(c, known) for c in args.constraint]
    floor = [] if args.no_quality_floor else constraints.quality_floor(data.objectives)
    return summarize(data, [*floor, *given], args.tolerance, args.quality, args.cost)


def _report(args: argparse.Namespace) -> int:
    from analysis import report

    data = _load(args.study, args.paths, args.storage)
    summary = _summarize(data, args)
    out = args.out or PROJECT_ROOT / "reports" / data.name
    written = report.write(summary, out.resolve(), pngs=not args.no_png)
    print(written.markdown.read_text())
    print(f"report: {written.html}\nsummary: {written.markdown}\ntrials: {written.csv}")
    for path in written.pngs:
        print(f"figure: {path}")
    for kind, (path, command) in written.configs.items():
        print(f"{kind} config: {path}  (run: {command})")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from analysis import compare

    a = _summarize(_load(args.a, [], args.storage), args)
    b = _summarize(_load(args.b, [], args.storage_b or args.storage), args)
    out = args.out or PROJECT_ROOT / "reports" / f"compare-{a.data.name}-{b.data.name}"
    for path in compare.write(a, b, out.resolve(), png=not args.no_png):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="the Pareto report of a study: HTML, Markdown, CSV, PNGs, best configs")
    rep.add_argument("paths", nargs="*", type=Path, help="sweep folders or result.json files (instead of the storage)")
    rep.add_argument("--study", help="study name (with paths: only that study's records)")
    rep.add_argument("--out", type=Path, help="report folder (default: reports/<study>)")
    _summary_args(rep)
    cmp_ = sub.add_parser("compare", help="two studies' fronts on one plot")
    cmp_.add_argument("a", help="study name (in --storage) or a sweep folder")
    cmp_.add_argument("b", help="study name (in --storage-b, else --storage) or a sweep folder")
    cmp_.add_argument("--storage-b", help="storage of the second study, when it is elsewhere")
    cmp_.add_argument("--out", type=Path, help="output folder (default: reports/compare-A-B)")
    _summary_args(cmp_)
    r = sub.add_parser("ratios", help="each setting's metrics as ratios to a reference setting")
    r.add_argument("paths", nargs="+", type=Path, help="sweep folders or result.json files")
    r.add_argument("--keys", nargs="+", required=True, help="the config keys the sweep varied")
    r.add_argument("--reference", nargs="+", required=True, help="key=value of the reference setting")
    r.add_argument("--metrics", nargs="+", default=list(ratios.DEFAULT_METRICS))
    r.add_argument("--readme", type=Path, help="also write the table between the ratio markers of this file")
    r.add_argument("--block", help="write between <!-- ratios:BLOCK:begin/end --> (several tables in one file)")
    args = parser.parse_args(argv)
    if args.command in ("report", "compare"):
        try:
            return _report(args) if args.command == "report" else _compare(args)
        except ValueError as exc:  # bad input: a one-line reason, not a traceback
            parser.error(str(exc))

    records = ratios.load_records(args.paths)
    if not records:
        parser.error(f"no completed trial under {[str(p) for p in args.paths]}")
    bad = [x for x in args.reference if "=" not in x]
    if bad:
        parser.error(f"--reference takes key=value pairs, got {bad}")
    try:
        text = ratios.table(records, args.keys, dict(x.split("=", 1) for x in args.reference), args.metrics)
        if args.readme:
            args.readme.write_text(ratios.replace_block(args.readme.read_text(), text, args.block))
    except ValueError as exc:
        parser.error(str(exc))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
