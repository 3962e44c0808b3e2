"""``python -m bench``: how close our fine-tuning runs to this CPU's limit, and against transformers.Trainer."""

from __future__ import annotations

import argparse
from pathlib import Path


def check_readme_block(p: argparse.ArgumentParser, readme: Path, block: str) -> None:
    """The README block a benchmark will write exists: said before the measuring rather than after it."""
    from analysis.ratios import check_block

    try:
        check_block(readme.read_text(), block)
    except (OSError, ValueError) as exc:
        p.error(f"--readme {readme} --block {block}: {exc}")
