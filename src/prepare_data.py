"""``python -m src.prepare_data``: the default data (MTS-Dialog) on any machine.

Nothing to do when the folder the default data config reads (``conf/data/mts_dialog.yaml``: the
environment variable PARETUNE_DATA_DIR, else ``../shared/data`` beside the checkout) already holds
the data. Otherwise the official CSV files are downloaded from a pinned commit of
github.com/abachaa/MTS-Dialog, checked against their SHA-256, converted to our JSON Lines (the same
fields, ids and text as the shared copy) and written there with the license and the attribution.
Without network, ``--from <folder>`` converts files downloaded by hand elsewhere.

MTS-Dialog is CC BY 4.0: Ben Abacha, Yim, Fan, Lin, EACL 2023; the dialogues were written from
MTSamples sample notes (https://www.mtsamples.com). The attribution travels with the data.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = "abachaa/MTS-Dialog"
# The newest commit when this was written (2025-05-30, a README edit; the CSV files date from 2023).
# A new commit upstream changes nothing here: files are fetched at this commit and checked below.
COMMIT = "3ff0801933608d6f570468c13125125fb5cabdea"
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
# Far above the largest file (2.7 MB): a wrong URL serving something huge is cut off, not stored.
_MAX_BYTES = 64 * 1024 * 1024
_TIMEOUT_S = 60
REQUIRED = ("train.jsonl", "validation.jsonl")  # what the default data config reads
CSV_COLUMNS = ("ID", "section_header", "section_text", "dialogue")


@dataclass(frozen=True)
class Source:
    path: str      # in the repository at COMMIT
    sha256: str    # of the file's bytes at COMMIT
    output: str    # written as this name
    id_tag: str    # ids are mtsdialog-<id_tag>-<row number>, as in the shared copy


# Checksums computed from the repository's blobs at COMMIT.
SOURCES = (
    Source("Main-Dataset/MTS-Dialog-TrainingSet.csv",
           "65a28681dd59fc159681ea026e44610f2af7bc64a0e7f892d763eb03d9f503dc", "train.jsonl", "train"),
    Source("Main-Dataset/MTS-Dialog-ValidationSet.csv",
           "227206520c4534381c0d7fba6d3f09319a9af5a6d9603a93c0341af1198e3958", "validation.jsonl", "validation"),
    Source("Main-Dataset/MTS-Dialog-TestSet-1-MEDIQA-Chat-2023.csv",
           "b4d38dd2c99b2e9860099abcf653f1e0f3e9b69f9fcc45be2a2699b37a4d2f37", "test1.jsonl", "test1"),
    # The 1201 training pairs followed by their 2402 French and Spanish back-translations.
    Source("Augmented-Data/MTS-Dialog-Augmented-TrainingSet-3-FR-and-ES-3603-Pairs-final.csv",
           "9c77882a691380b8d373ad868160e44fc5a424cac46ef019671e540f6b128b03", "train_augmented.jsonl", "trainaug"),
    Source("LICENSE.txt", "5b63c5abb5f4218f79230730b3733ce681383e2d656044069b8c73cbdb8e7fb7",
           "LICENSE_CC-BY-4.0.txt", ""),
)

ATTRIBUTION = f"""# MTS-Dialog, prepared by paretune (python -m src.prepare_data)

Source: https://github.com/{REPO} at commit {COMMIT} (Main-Dataset/*.csv and
Augmented-Data/MTS-Dialog-Augmented-TrainingSet-3-FR-and-ES-3603-Pairs-final.csv), converted to JSON
Lines: one record a line with `id`, `split`, `source` (the dialogue), `summary` (the section text) and
`section_header`. Line ends and trailing spaces were normalized; nothing else was changed.

License: Creative Commons Attribution 4.0 International (CC BY 4.0), see LICENSE_CC-BY-4.0.txt.
Keep this attribution in any README or report that uses the data.

Cite: Asma Ben Abacha, Wen-wai Yim, Yadan Fan, Thomas Lin. "An Empirical Study of Clinical Note
Generation from Doctor-Patient Encounters". EACL 2023, pages 2291-2302.
https://aclanthology.org/2023.eacl-main.168

The dialogues were written from the sample notes of MTSamples: credit https://www.mtsamples.com
"""


class PrepareError(RuntimeError):
    """The data could not be prepared; the message says why and what to do."""


def default_root() -> Path:
    """The folder holding ``mts_dialog/``, resolved exactly as the default data config resolves it."""
    from omegaconf import OmegaConf

    from src.config import register_configs
    from src.paths import PROJECT_ROOT

    register_configs()  # the ${paretune_root:} resolver
    dcfg = OmegaConf.load(PROJECT_ROOT / "conf" / "data" / "mts_dialog.yaml")
    return Path(str(dcfg.root)).expanduser().parent


def normalize(text: str) -> str:
    """Line ends as \\n, no trailing spaces on a line, none around the text; inner spacing kept."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip()


def convert(raw: bytes, source_name: str, split: str, id_tag: str) -> str:
    """One official CSV file (its bytes) as our JSON Lines text."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrepareError(f"{source_name}: not UTF-8 (byte {exc.start}); is it the official file?") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise PrepareError(f"{source_name}: no column {', '.join(missing)} (expected {', '.join(CSV_COLUMNS)}); "
                           "is it the official file?")
    lines = []
    for i, row in enumerate(reader):
        record = {"id": f"mtsdialog-{id_tag}-{i}", "split": split, "source": normalize(row["dialogue"] or ""),
                  "summary": normalize(row["section_text"] or ""), "section_header": row["section_header"]}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    if not lines:
        raise PrepareError(f"{source_name}: no rows")
    return "".join(lines)


def _download(src: Source) -> bytes:
    url = RAW_URL.format(repo=REPO, commit=COMMIT, path=src.path)
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:  # noqa: S310 - a fixed https URL
            raw: bytes = resp.read(_MAX_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PrepareError(f"cannot download {url} ({reason}).\n{_offline_help()}") from None
    if len(raw) > _MAX_BYTES:
        raise PrepareError(f"{url} is larger than {_MAX_BYTES} bytes: not the expected file; nothing written")
    return raw


def _offline_help() -> str:
    names = "\n".join(f"    {s.path}" for s in SOURCES)
    return ("Without network here, either:\n"
            f"  - on a machine with network, download these files of https://github.com/{REPO} at commit "
            f"{COMMIT}\n{names}\n"
            "    into one folder, bring it here and run: python -m src.prepare_data --from <that folder>\n"
            "  - or copy an already prepared mts_dialog/ folder here and set PARETUNE_DATA_DIR to the folder "
            "that holds it")


def _local(src: Source, folder: Path) -> bytes:
    for candidate in (folder / src.path, folder / Path(src.path).name):
        if candidate.is_file():
            return candidate.read_bytes()
    raise PrepareError(f"{folder} has no {Path(src.path).name} (nor {src.path}); download it from "
                       f"https://github.com/{REPO} at commit {COMMIT}")


def _checked(src: Source, raw: bytes) -> bytes:
    got = hashlib.sha256(raw).hexdigest()
    if got != src.sha256:
        raise PrepareError(f"{src.path}: SHA-256 {got} differs from the pinned {src.sha256} (commit {COMMIT}); "
                           "the file is damaged or not the official one. Nothing was written; download it "
                           "again from the pinned commit")
    return raw


def build(out: Path, sources: tuple[Source, ...] = SOURCES, from_dir: Path | None = None) -> None:
    """Fetch (or read), check and convert every source into ``out``, which must not hold data yet.

    Everything is written in a temporary folder beside ``out`` and moved in place at the end, so a
    failure (no network, a bad checksum) leaves nothing half-prepared.
    """
    if out.exists() and any(out.iterdir()):
        raise PrepareError(f"{out} exists and is not empty, but lacks {' or '.join(REQUIRED)}; move it away (or "
                           "set PARETUNE_DATA_DIR to another folder) and run again")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        staging = Path(tmp) / out.name
        staging.mkdir()
        for src in sources:
            raw = _checked(src, _local(src, from_dir) if from_dir else _download(src))
            if src.id_tag:
                split = src.output.removesuffix(".jsonl")
                (staging / src.output).write_text(convert(raw, src.path, split, src.id_tag), encoding="utf-8")
            else:
                (staging / src.output).write_bytes(raw)
        (staging / "ATTRIBUTION.md").write_text(ATTRIBUTION, encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        shutil.move(str(staging), str(out))


def is_ready(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.prepare_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="folder that holds (or will hold) mts_dialog/; default: where conf/data/mts_dialog.yaml "
                             "reads it (PARETUNE_DATA_DIR, else ../shared/data beside the checkout)")
    parser.add_argument("--from", dest="from_dir", type=Path, default=None,
                        help="convert the official CSV files from this folder instead of downloading them")
    args = parser.parse_args(argv)
    out = (args.root or default_root()) / "mts_dialog"
    if is_ready(out):
        print(f"MTS-Dialog is ready in {out}")
        return 0
    print(f"MTS-Dialog is not in {out}: preparing it from github.com/{REPO} at commit {COMMIT[:12]}")
    try:
        build(out, from_dir=args.from_dir)
    except (PrepareError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MTS-Dialog prepared in {out} (CC BY 4.0: see ATTRIBUTION.md there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
