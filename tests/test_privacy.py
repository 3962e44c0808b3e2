"""Privacy profiles: what a trial writes is readable by its owner only under privacy=strict."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.conftest import TINY, run_cli


def _modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(dirpath) / name
            if not path.is_symlink():  # a link's own mode means nothing on Linux; its target is checked
                out[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return out


def test_strict_makes_every_written_file_owner_only(tmp_path, data_root, cache_dir):
    proc = run_cli(["-m", *TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}", "privacy=strict",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", "lora.r=2,4"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    modes = _modes(sweep)
    assert "0/result.json" in modes and "1/predictions.jsonl" in modes and "0/.hydra/config.yaml" in modes
    assert any(k.startswith("0/wandb/") for k in modes)  # W&B's own files are covered too
    open_to_others = {k: oct(m) for k, m in modes.items() if m & 0o077}
    assert open_to_others == {}
    assert stat.S_IMODE(sweep.stat().st_mode) == 0o700
    journal = tmp_path / "studies" / "paretune.journal"
    assert stat.S_IMODE(journal.stat().st_mode) & 0o077 == 0


def test_standard_keeps_the_usual_permissions(tmp_path, data_root, cache_dir):
    old = os.umask(0o022)
    try:
        proc = run_cli([*TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}", "logger=none",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stat.S_IMODE((tmp_path / "run" / "result.json").stat().st_mode) == 0o644
