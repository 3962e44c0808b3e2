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


WANDB_CANARY = "canary-wandb-key-0123456789abcdef0123456789abcdef"


def _files_containing(root: Path, needle: str) -> list[str]:
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                if needle.encode() in path.read_bytes():
                    hits.append(str(path.relative_to(root)))
            except OSError:
                pass
    return hits


def test_planted_secrets_appear_in_no_written_file(tmp_path, data_root, cache_dir, pg):
    """A W&B key in the environment and a storage password on the command line: neither is in any file
    the sweep writes (records, .hydra/ dumps, logs, W&B files, multirun.yaml), nor in its output."""
    password = pg.url.split(":")[2].split("@")[0]
    assert len(password) >= 8
    proc = run_cli(["-m", *TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}", "lora.r=2,4",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.sweeper.storage={pg.url}",
                    "hydra.sweeper.study_name=canary"], cwd=tmp_path, env={"WANDB_API_KEY": WANDB_CANARY})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sweep" / "1" / "result.json").exists()
    for secret in (password, WANDB_CANARY):
        assert _files_containing(tmp_path, secret) == []
        assert secret not in proc.stdout and secret not in proc.stderr
    hydra_dump = (tmp_path / "sweep" / "0" / ".hydra" / "hydra.yaml").read_text()
    assert "postgresql://" in hydra_dump and ":***@" in hydra_dump  # masked, not dropped
