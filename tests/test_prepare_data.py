"""The default data on any machine: the MTS-Dialog converter, the checksum guard, and what
``python -m src.prepare_data`` (run by ``make sweep``) says with and without network."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src import data, prepare_data
from src.config import PROJECT_ROOT
from src.prepare_data import COMMIT, SOURCES, PrepareError

# The official files' columns and quirks: CRLF line ends inside quoted dialogues, a trailing space
# after each turn, commas and quotes inside fields, an ID column that is not always a number.
CSV = (b'ID,section_header,section_text,dialogue\r\n'
       b'0,GENHX,"The patient, a 40-year-old, reports ""sharp"" knee pain.  Worse on stairs. ",'
       b'"Doctor: What brings you in? \r\nPatient: My knee, doctor. \r\n Doctor: Since when?"\r\n'
       b'TR=EN-ES-EN 1,ALLERGY,No known drug allergies.,"Doctor: Allergies?\nPatient: None."\r\n')
DCFG = OmegaConf.load(PROJECT_ROOT / "conf" / "data" / "mts_dialog.yaml")  # the fields the trials read


def test_the_converter_writes_what_our_loader_reads(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(prepare_data.convert(CSV, "x.csv", "train", "train"), encoding="utf-8")
    records = data.load_records(path, DCFG)
    assert [r.id for r in records] == ["mtsdialog-train-0", "mtsdialog-train-1"]  # row numbers, as the shared copy
    first = records[0]
    assert first.source == "Doctor: What brings you in?\nPatient: My knee, doctor.\n Doctor: Since when?"
    assert first.summary == 'The patient, a 40-year-old, reports "sharp" knee pain.  Worse on stairs.'
    assert (first.header, records[1].header) == ("GENHX", "ALLERGY")
    assert path.read_text().splitlines()[0].startswith('{"id": "mtsdialog-train-0", "split": "train", ')


def test_a_csv_without_the_official_columns_is_refused():
    with pytest.raises(PrepareError, match="x.csv: no column section_text, dialogue"):
        prepare_data.convert(b"ID,section_header,summary\n0,CC,x\n", "x.csv", "train", "train")


def _downloaded(folder: Path, content: dict[str, bytes] | None = None) -> Path:
    """A folder laid out like the repository, as a user without network would bring it."""
    for src in SOURCES:
        path = folder / src.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((content or {}).get(src.path, CSV if src.id_tag else b"CC BY 4.0 license text\n"))
    return folder


def test_a_prepared_folder_has_every_split_the_license_and_the_attribution(tmp_path, monkeypatch):
    folder = _downloaded(tmp_path / "download")
    # the pinned checksums are those of the official files; these test files get their own
    pinned = tuple(dataclasses.replace(s, sha256=hashlib.sha256((folder / s.path).read_bytes()).hexdigest())
                   for s in SOURCES)
    out = tmp_path / "data" / "mts_dialog"
    prepare_data.build(out, pinned, from_dir=folder)
    assert sorted(p.name for p in out.iterdir()) == ["ATTRIBUTION.md", "LICENSE_CC-BY-4.0.txt", "test1.jsonl",
                                                    "train.jsonl", "train_augmented.jsonl", "validation.jsonl"]
    attribution = (out / "ATTRIBUTION.md").read_text()
    for credit in ("CC BY 4.0", "Ben Abacha", "https://www.mtsamples.com", COMMIT):
        assert credit in attribution
    assert (out / "LICENSE_CC-BY-4.0.txt").read_bytes() == b"CC BY 4.0 license text\n"
    assert data.load_records(out / "train_augmented.jsonl", DCFG)[0].id == "mtsdialog-trainaug-0"
    # what a trial's preflight reads: the default data config pointed at the prepared folder
    monkeypatch.setenv("PARETUNE_DATA_DIR", str(out.parent))
    assert prepare_data.default_root() == out.parent
    assert data.check_files(OmegaConf.merge(DCFG, {"root": str(out)}), 2) == {"train": 2, "eval": 2}


def test_a_checksum_mismatch_is_refused_and_nothing_is_written(tmp_path):
    folder = _downloaded(tmp_path / "download")  # right names, wrong bytes for the pinned checksums
    out = tmp_path / "data" / "mts_dialog"
    with pytest.raises(PrepareError) as err:
        prepare_data.build(out, from_dir=folder)
    got = hashlib.sha256(CSV).hexdigest()
    assert f"Main-Dataset/MTS-Dialog-TrainingSet.csv: SHA-256 {got} differs from the pinned {SOURCES[0].sha256}" \
        in str(err.value)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no half-prepared folder, no staging left


def test_a_folder_that_is_neither_empty_nor_ready_is_not_overwritten(tmp_path):
    out = tmp_path / "mts_dialog"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="exists and is not empty, but lacks train.jsonl"):
        prepare_data.build(out, from_dir=_downloaded(tmp_path / "download"))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "src.prepare_data", *args], cwd=PROJECT_ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_without_network_the_command_says_what_to_do(tmp_path):
    proxy = f"http://127.0.0.1:{_closed_port()}"  # every download is refused at once, as with no network
    proc = _cli("--root", str(tmp_path), env={"HTTPS_PROXY": proxy, "https_proxy": proxy, "NO_PROXY": "",
                                               "no_proxy": ""})
    assert proc.returncode == 1, proc.stderr
    url = f"https://raw.githubusercontent.com/abachaa/MTS-Dialog/{COMMIT}/Main-Dataset/MTS-Dialog-TrainingSet.csv"
    for fragment in (f"cannot download {url}", "python -m src.prepare_data --from <that folder>",
                     "set PARETUNE_DATA_DIR", "Augmented-Data/MTS-Dialog-Augmented-TrainingSet-3"):
        assert fragment in proc.stderr, (fragment, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mts_dialog").exists()


def test_data_already_there_is_left_alone(tmp_path):
    ready = tmp_path / "mts_dialog"
    ready.mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        (ready / name).write_text("{}\n")
    proc = _cli(env={"PARETUNE_DATA_DIR": str(tmp_path), "HTTPS_PROXY": f"http://127.0.0.1:{_closed_port()}"})
    assert proc.returncode == 0, proc.stderr
    assert f"MTS-Dialog is ready in {ready}" in proc.stdout
    assert sorted(p.name for p in ready.iterdir()) == ["train.jsonl", "validation.jsonl"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_sweep_prepares_the_data_before_the_first_trial():
    dry = subprocess.run(["make", "-n", "sweep"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    commands = dry.stdout.splitlines()
    prepare = next(i for i, c in enumerate(commands) if "-m src.prepare_data" in c)
    train = next(i for i, c in enumerate(commands) if "-m src.train" in c)
    assert prepare < train
