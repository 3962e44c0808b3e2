"""The journal file of our studies: Optuna's JournalFileBackend, minus the way a torn line spreads.

A process that dies (or a disk that fills) in the middle of an append leaves the journal's last line
cut short. Optuna reads such a journal (it skips an unterminated last line), but its next append lands
right after the broken bytes, on the same line, and from then on every study in the file fails to
load with a JSONDecodeError. ``TornTailJournal`` cuts an unterminated tail off, under the journal's own
lock, before it appends; the cut bytes are kept beside the journal. A journal damaged before this
existed is refused with the line and the fix: ``python -m src.sweeper.journal --repair PATH``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import JournalFileSymlinkLock, get_lock_file

log = logging.getLogger(__name__)

_OP_START = b'{"op_code"'  # every journal line is one operation dict, written with this key first


class JournalDamaged(ValueError):
    """A line in the middle of the journal is not an operation: Optuna cannot load any study from it."""


class TornTailJournal(JournalFileBackend):
    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with get_lock_file(self._lock):  # the backend's own lock: every appender takes it
            cut_torn_tail(Path(self._file_path))
            data = ("\n".join(json.dumps(op, separators=(",", ":")) for op in logs) + "\n").encode()
            with open(self._file_path, "ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())


def cut_torn_tail(path: Path) -> bytes:
    """Truncate ``path`` after its last newline; the cut bytes are saved beside it and returned.
    Call with the journal's lock held."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return b""
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return b""
        end = size
        while end > 0:  # backwards, a block at a time, to the last complete line
            start = max(0, end - 65536)
            fh.seek(start)
            block = fh.read(end - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        else:
            keep = 0
        fh.seek(keep)
        tail = fh.read()
        kept = path.with_name(f"{path.name}.torn-{int(time.time())}")
        kept.write_bytes(tail)
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("%s ended in a line cut short (%d bytes; a crash or a full disk mid-write): cut off before "
                "appending, kept in %s", path, len(tail), kept)
    return tail


def check(path: Path) -> None:
    """Raise JournalDamaged naming the first line Optuna cannot read (an unterminated last line is
    fine: it is cut off at the next append)."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.endswith(b"\n"):
                return
            try:
                json.loads(line)
            except ValueError:
                raise JournalDamaged(
                    f"journal {path} is damaged at line {lineno} (a write was cut short, then another landed "
                    f"on the same line); no study in it can be loaded. Repair it with `python -m "
                    f"src.sweeper.journal --repair {path}` (a backup is kept)") from None


def repair(path: Path) -> tuple[int, int, Path]:
    """Rewrite a damaged journal: each broken line keeps the complete operation at its end, if any
    (what the append after the crash wrote), and loses the cut-short one. Returns (lines recovered,
    lines dropped, backup path)."""
    with get_lock_file(JournalFileSymlinkLock(str(path))):
        raw = path.read_bytes()
        backup = path.with_name(f"{path.name}.bak-{int(time.time())}")
        backup.write_bytes(raw)
        out, recovered, dropped = [], 0, 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                dropped += 1
                continue
            try:
                json.loads(line)
                out.append(line)
                continue
            except ValueError:
                pass
            op = _last_complete_op(line)
            if op is None:
                dropped += 1
            else:
                out.append(op)
                recovered += 1
        tmp = path.with_name(f".{path.name}.repair")
        tmp.write_bytes(b"".join(out))
        os.replace(tmp, path)
    return recovered, dropped, backup


def _last_complete_op(line: bytes) -> bytes | None:
    start = line.rfind(_OP_START)
    while start > 0:
        try:
            json.loads(line[start:])
            return line[start:]
        except ValueError:
            start = line.rfind(_OP_START, 0, start)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.sweeper.journal", description=__doc__.split("\n")[0])
    p.add_argument("path", type=Path)
    p.add_argument("--repair", action="store_true", help="rewrite a damaged journal (a backup is kept)")
    args = p.parse_args(argv)
    if not args.path.is_file():
        print(f"{args.path}: no such journal file", file=sys.stderr)
        return 2
    try:
        check(args.path)
    except JournalDamaged as exc:
        if not args.repair:
            print(exc, file=sys.stderr)
            return 1
        recovered, dropped, backup = repair(args.path)
        print(f"{args.path}: {recovered} damaged line(s) recovered, {dropped} dropped; the original is {backup}")
        check(args.path)
        return 0
    print(f"{args.path}: every line is readable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
