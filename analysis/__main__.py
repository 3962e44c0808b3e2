"""``python -m analysis <command>``: turn a study into a decision a team can act on.

    python -m analysis report --study NAME [--storage URL] [SWEEP_DIR...] [--constraint 'M >= X']...
    python -m analysis compare STUDY_OR_DIR_A STUDY_OR_DIR_B [--storage URL]
    python -m analysis ratios SWEEP_DIR... --keys cpu.allocator cpu.threads quant \\
        --reference cpu.allocator=system cpu.threads=2 quant=none [--readme README.md [--block NAME]]
    python -m analysis scaling SWEEP_DIR... [--gemm-gflops X] [--readme README.md --block scaling]

Bad input ends with one line naming the problem and the fix (exit 2); an output that cannot be
written, or an unexpected failure, with one line too (exit 1). ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from analysis import ratios
from src.paths import PROJECT_ROOT
from src.redact import remember, scrub_text

STORAGE_ENV = "PARETUNE_STUDY_STORAGE"
REPORTS_ENV = "PARETUNE_REPORTS_DIR"   # where reports go when --out is not given (default: reports/)
DEFAULT_STORAGE = os.environ.get(STORAGE_ENV, str(PROJECT_ROOT / "studies" / "paretune.journal"))
T = TypeVar("T")


class CannotWrite(Exception):
    """An output that cannot be written: the input was fine, the place is not (exit 1)."""


def check_storage(storage: str, flag: str = "--storage") -> str:
    """``storage`` if a study can be read from it, else a ValueError naming --storage and the fix.

    Reading must never create anything: opening a journal path that does not exist would create an
    empty journal (and its folders), and a typo would then look like a storage with no studies."""
    from src.sweeper.study import supported_scheme

    fix = f"give {flag} (or set {STORAGE_ENV}) the journal file or database URL the sweep recorded into"
    if "://" in storage:
        scheme = storage.split("://", 1)[0]  # only the scheme is quoted: the rest may hold a password
        if not supported_scheme(storage):
            raise ValueError(f"{flag}: unsupported scheme '{scheme}://'; {fix}: a journal file path, "
                             "a postgresql:// URL or a sqlite:/// URL")
        database = storage.split(":///", 1)[1] if scheme.startswith("sqlite") and ":///" in storage else None
        if database and database != ":memory:" and not Path(database).is_file():
            raise ValueError(f"{flag}: no SQLite database at {database}; {fix}")
        return storage
    path = Path(storage).expanduser()
    if not path.exists():
        raise ValueError(f"{flag}: no journal file at {path}; {fix} (default: studies/paretune.journal)")
    if not path.is_file():
        raise ValueError(f"{flag}: {path} is not a journal file; {fix}")
    return storage


def folder_name(name: str) -> str:
    """A study name as a single folder name: separators and leading dots replaced, so that a name
    like '../x' or '/x' cannot put its report outside the reports folder."""
    safe = re.sub(r"[^\w.,=+-]", "_", name)
    safe = re.sub(r"^\.+", lambda m: "_" * len(m.group()), safe)
    return safe or "_"


def default_out(name: str) -> Path:
    """``<reports>/<name>`` (reports/ of the project, or $PARETUNE_REPORTS_DIR), always inside it."""
    root = Path(os.environ.get(REPORTS_ENV) or PROJECT_ROOT / "reports").resolve()
    out = (root / folder_name(name)).resolve()
    if out.parent != root:  # folder_name makes this impossible; the check keeps it so
        raise ValueError(f"the report folder of study '{name}' would leave {root}; give --out")
    return out


def _clean(text: str, args: argparse.Namespace) -> str:
    """An error message safe to print: URL passwords masked, and any piece of the given storages'
    passwords too (a driver that cannot parse a password with '/', '@' or ':' quotes a piece of it)."""
    for storage in (getattr(args, "storage", None), getattr(args, "storage_b", None)):
        remember(storage)
    return scrub_text(text)


def _writing(out: Path, action: Callable[[], T]) -> T:
    try:
        return action()
    except OSError as exc:
        raise CannotWrite(f"cannot write to {out}: {exc.strerror or exc}; give --out a folder you can "
                          "write to") from exc


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


def _load(source: str | None, paths: list[Path], storage: str, folder_ok: bool = False,  # type: ignore[no-untyped-def]
          flag: str = "--storage"):
    from analysis import trials

    if paths:
        return trials.from_records(paths, source)
    if source is None:
        raise ValueError("give --study NAME (read from --storage) or sweep folders / result.json files")
    if folder_ok and Path(source).exists():
        return trials.from_records([Path(source)])
    check_storage(storage, flag)
    from src.sweeper.study import StudyError

    try:
        return trials.from_storage(source, storage)
    except StudyError as exc:  # its message names the sweeper's setting; here the flag is --storage
        raise ValueError(str(exc).replace("hydra.sweeper.storage", flag, 1)) from exc


def _warn_unreadable(data) -> None:  # type: ignore[no-untyped-def]
    from analysis.trials import describe_unreadable

    if data.unreadable:
        print(f"warning: {data.name}: unreadable records, left out: {describe_unreadable(data.unreadable)}",
              file=sys.stderr)


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
    out = args.out.resolve() if args.out else default_out(data.name)
    written = _writing(out, lambda: report.write(summary, out, pngs=not args.no_png))
    print(written.markdown.read_text())
    print(f"report: {written.html}\nsummary: {written.markdown}\ntrials: {written.csv}")
    for path in written.pngs:
        print(f"figure: {path}")
    for kind, (path, command) in written.configs.items():
        print(f"{kind} config: {path}  (run: {command})")
    _warn_unreadable(data)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from analysis import compare

    a = _summarize(_load(args.a, [], args.storage, folder_ok=True), args)
    b = _summarize(_load(args.b, [], args.storage_b or args.storage, folder_ok=True,
                         flag="--storage-b" if args.storage_b else "--storage"), args)
    out = args.out.resolve() if args.out else default_out(
        f"compare-{folder_name(a.data.name)}-{folder_name(b.data.name)}")
    for path in _writing(out, lambda: compare.write(a, b, out, png=not args.no_png)):
        print(path)
    _warn_unreadable(a.data)
    _warn_unreadable(b.data)
    return 0


def _ratios(args: argparse.Namespace) -> int:
    from analysis.trials import describe_unreadable

    bad = [x for x in args.reference if "=" not in x]
    if bad:
        raise ValueError(f"--reference takes key=value pairs, got {bad}")
    records, unreadable = ratios.read_records(args.paths)
    if not records:
        also = f"; unreadable records: {describe_unreadable(unreadable)}" if unreadable else ""
        raise ValueError(f"no completed trial under {[str(p) for p in args.paths]}{also}")
    text = ratios.table(records, args.keys, dict(x.split("=", 1) for x in args.reference), args.metrics)
    return _publish_table(text, args, unreadable)


def _publish_table(text: str, args: argparse.Namespace, unreadable: list[tuple[str, str]]) -> int:
    """Print a table, and write it between the --readme file's markers when asked."""
    from analysis.trials import describe_unreadable

    if args.readme:
        try:
            document = args.readme.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--readme {args.readme}: cannot read it ({getattr(exc, 'strerror', None) or exc}); "
                             "give a Markdown file holding the ratio markers") from exc
        new = ratios.replace_block(document, text, args.block)
        _writing(args.readme, lambda: args.readme.write_text(new))
    print(text)
    if unreadable:
        print(f"warning: unreadable records, left out: {describe_unreadable(unreadable)}", file=sys.stderr)
    return 0


def _scaling(args: argparse.Namespace) -> int:
    from analysis import scaling
    from analysis.trials import describe_unreadable
    from src import hw

    found, unreadable = ratios.read_records_with_files(args.paths)
    records = [(record, f.parent) for record, f in found]  # each trial's folder: its train_log.jsonl
    if not records:
        also = f"; unreadable records: {describe_unreadable(unreadable)}" if unreadable else ""
        raise ValueError(f"no completed trial under {[str(p) for p in args.paths]}{also}")
    gemm = args.gemm_gflops
    if gemm is None and not args.no_speed:
        gemm = float(hw.gemm_peak(hw.usable_cores())["gflops_peak"])
    facts = hw.probe()
    machine = f"{facts['model']}, {facts['usable_cores']} cores, {hw.memory_mb() / 1024:.0f} GiB"
    table_rows = scaling.rows(records, gemm)
    text = scaling.table(table_rows, gemm, machine)
    if args.json:
        payload = {"machine": machine, "gemm_gflops": gemm, "rows": table_rows}
        _writing(args.json, lambda: args.json.write_text(json.dumps(payload, indent=1) + "\n"))
    return _publish_table(text, args, unreadable)


def _confirm(args: argparse.Namespace) -> int:
    from analysis import confirm, report

    data = _load(args.study, args.paths, args.storage)
    summary = _summarize(data, args)
    out = args.out.resolve() if args.out else default_out(f"{data.name}-confirm")
    out.mkdir(parents=True, exist_ok=True)
    command, link = confirm.plan(summary, out, args.seeds, args.top, args.test_file, args.examples, args.overrides)
    print(f"confirming {', '.join(link['configurations'])} of {data.name} on {link['test_file']} with seeds "
          f"{link['seeds']} as study {link['study']}:\n{link['command']}", flush=True)
    if args.dry_run:
        return 0
    storage = None if args.paths else args.storage
    code = confirm.run(command, storage)
    if not (out / "sweep").is_dir():
        raise ValueError(f"the confirmation sweep stopped before its first trial (exit {code}); its error is above")
    confirmed = _load(None, [out / "sweep"], args.storage)
    final = _summarize(confirmed, args)
    written = _writing(out / "report", lambda: report.write(final, out / "report", pngs=not args.no_png))
    print(written.markdown.read_text())
    print(f"confirmation report: {written.html}\nlink to the study it confirms: {out / confirm.LINK_FILE}")
    _warn_unreadable(confirmed)
    return 0 if code == 0 else 1


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the Python traceback too")
    parser = argparse.ArgumentParser(prog="python -m analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", parents=[common],
                         help="the Pareto report of a study: HTML, Markdown, CSV, PNGs, best configs")
    rep.add_argument("paths", nargs="*", type=Path, help="sweep folders or result.json files (instead of the storage)")
    rep.add_argument("--study", help="study name (with paths: only that study's records)")
    rep.add_argument("--out", type=Path,
                     help="report folder (default: reports/<study>, or $PARETUNE_REPORTS_DIR/<study>)")
    _summary_args(rep)
    cmp_ = sub.add_parser("compare", parents=[common], help="two studies' fronts on one plot")
    cmp_.add_argument("a", help="study name (in --storage) or a sweep folder")
    cmp_.add_argument("b", help="study name (in --storage-b, else --storage) or a sweep folder")
    cmp_.add_argument("--storage-b", help="storage of the second study, when it is elsewhere")
    cmp_.add_argument("--out", type=Path, help="output folder (default: reports/compare-A-B)")
    _summary_args(cmp_)
    con = sub.add_parser("confirm", parents=[common],
                         help="run a study's front again with several seeds on the held-out test split")
    con.add_argument("paths", nargs="*", type=Path, help="sweep folders or result.json files (instead of the storage)")
    con.add_argument("--study", help="study name (with paths: only that study's records)")
    con.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    con.add_argument("--top", type=int, help="the K best feasible configurations by the first objective, "
                                             "instead of the front")
    con.add_argument("--test-file", help="the held-out file (default: the trials' data.test_file)")
    con.add_argument("--examples", type=int, help="test examples to evaluate (default: the study's eval.num_examples)")
    con.add_argument("--out", type=Path, help="folder (default: reports/<study>-confirm)")
    con.add_argument("--dry-run", action="store_true", help="write the configs and print the command only")
    con.add_argument("--override", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="an extra override for every confirmation trial, e.g. logger=none (repeatable)")
    _summary_args(con)
    r = sub.add_parser("ratios", parents=[common], help="each setting's metrics as ratios to a reference setting")
    r.add_argument("paths", nargs="+", type=Path, help="sweep folders or result.json files")
    r.add_argument("--keys", nargs="+", required=True, help="the config keys the sweep varied")
    r.add_argument("--reference", nargs="+", required=True, help="key=value of the reference setting")
    r.add_argument("--metrics", nargs="+", default=list(ratios.DEFAULT_METRICS))
    r.add_argument("--readme", type=Path, help="also write the table between the ratio markers of this file")
    r.add_argument("--block", help="write between <!-- ratios:BLOCK:begin/end --> (several tables in one file)")
    sc = sub.add_parser("scaling", parents=[common],
                        help="speed, memory, load time and adapter size against model size, with the plan beside")
    sc.add_argument("paths", nargs="+", type=Path, help="the scaling study's sweep folders or result.json files")
    sc.add_argument("--gemm-gflops", type=float,
                    help="the fp32 GEMM peak the planned speeds use (default: measured now, on this machine)")
    sc.add_argument("--no-speed", action="store_true", help="no planned speeds (skips the GEMM measurement)")
    sc.add_argument("--json", type=Path, help="also write the rows (measured and planned) to this JSON file")
    sc.add_argument("--readme", type=Path, help="also write the table between the ratio markers of this file")
    sc.add_argument("--block", help="write between <!-- ratios:BLOCK:begin/end --> (several tables in one file)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    run = {"report": _report, "compare": _compare, "ratios": _ratios, "confirm": _confirm,
           "scaling": _scaling}[args.command]
    if args.command not in ("ratios", "scaling"):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        return run(args)
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, ValueError):  # bad input: the reason and the fix
            parser.exit(2, f"{prog}: error: {_clean(str(exc), args)}\n")
        if isinstance(exc, CannotWrite):
            parser.exit(1, f"{prog}: error: {_clean(str(exc), args)}\n")
        parser.exit(1, f"{prog}: error: unexpected {type(exc).__name__}: {_clean(str(exc), args)}; "
                       "run it again with --debug for the traceback\n")
    return 1  # not reached: parser.exit raises SystemExit


if __name__ == "__main__":
    from src.redact import guard_process

    guard_process()  # a password given in --storage or PARETUNE_STUDY_STORAGE: never printed, whatever prints it
    sys.exit(main())
