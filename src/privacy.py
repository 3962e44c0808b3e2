"""File permissions of what a trial writes: the user's umask, or owner-only (privacy=strict).

Owner-only is a process umask of 077, set before the trial writes anything and inherited by the
worker, plus a chmod of what Hydra wrote before the task started (the sweep and trial directories
and their .hydra/ dumps) and of the study journal.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

OWNER_ONLY_UMASK = 0o077


def _owner_only(path: Path) -> None:
    mode = path.stat().st_mode
    os.chmod(path, stat.S_IMODE(mode) & 0o700)


def apply(owner_only: bool, trial_dir: Path, top: Path | None = None, extra: tuple[Path, ...] = ()) -> None:
    """With ``owner_only``: umask 077 for this process and its children, and every directory from
    ``top`` (the sweep or run directory) down to ``trial_dir``, what is already in ``trial_dir``, and
    the ``extra`` files (the study journal) made owner-only."""
    if not owner_only:
        return
    os.umask(OWNER_ONLY_UMASK)
    trial_dir = trial_dir.resolve()
    top = (top or trial_dir).resolve()
    for path in (trial_dir, *trial_dir.parents):
        _owner_only(path)
        if path == top or path.parent == path:
            break
    for root, dirs, files in os.walk(trial_dir):
        for name in [*dirs, *files]:
            _owner_only(Path(root) / name)
    for path in top.iterdir():  # the sweep's own files (multirun.yaml, trials.jsonl)
        if path.is_file():
            _owner_only(path)
    for path in extra:
        if path.exists():
            _owner_only(path)
