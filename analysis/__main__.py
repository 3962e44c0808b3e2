"""``python -m analysis <command>``: turn trial records into tables a team can act on.

    python -m analysis ratios SWEEP_DIR... --keys cpu.allocator cpu.threads quant \\
        --reference cpu.allocator=system cpu.threads=2 quant=none [--readme README.md [--block NAME]]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis import ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("ratios", help="each setting's metrics as ratios to a reference setting")
    r.add_argument("paths", nargs="+", type=Path, help="sweep folders or result.json files")
    r.add_argument("--keys", nargs="+", required=True, help="the config keys the sweep varied")
    r.add_argument("--reference", nargs="+", required=True, help="key=value of the reference setting")
    r.add_argument("--metrics", nargs="+", default=list(ratios.DEFAULT_METRICS))
    r.add_argument("--readme", type=Path, help="also write the table between the ratio markers of this file")
    r.add_argument("--block", help="write between <!-- ratios:BLOCK:begin/end --> (several tables in one file)")
    args = parser.parse_args(argv)

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
