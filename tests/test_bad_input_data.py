"""Bad data files, through the real command line: each is refused with the file, the line or field, and
the fix, before any worker starts; or, for input that is merely awkward, accepted and counted.

The helpers (a data folder, a record line, the refusal checks, the earlier record that must stay
untouched) are those of tests/test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli
from tests.test_bad_input import _data, _line, _refused
from tests.test_bad_input import recorded as recorded  # noqa: F401 - a fixture, used by name below


def _args(root: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={root}", f"paths.cache_dir={cache_dir}", *extra]


LINE_CASES = {
    # json.dumps writes a lone surrogate as the escape \ud800, which json.loads reads back as is
    "lone surrogate in the source": (_line(source="Doctor: hi \ud800 there."),
                                     ["train.jsonl:1:", "field 'source' (data.source_field)", "lone surrogate"]),
    "lone surrogate in the id": (_line(id="a\udfff"), ["train.jsonl:1:", "'id' (data.id_field)", "lone surrogate"]),
    "null id": (_line(id=None), ["train.jsonl:1:", "null id in field 'id'", "data.id_field"]),
}


@pytest.mark.parametrize("case", sorted(LINE_CASES))
def test_a_bad_value_in_a_record_is_refused_with_its_line_and_field(tmp_path, recorded, cache_dir, case):  # noqa: F811
    content, fragments = LINE_CASES[case]
    root = _data(tmp_path / "data", _line(id="first") + content)
    fragments = [f.replace(":1:", ":2:") for f in fragments]
    _refused(tmp_path, recorded, _args(root, cache_dir), fragments)


def _directory(root: Path) -> None:
    (root / "train.jsonl").mkdir()


def _fifo(root: Path) -> None:
    os.mkfifo(root / "train.jsonl")  # opening it would wait for a writer: the command must not


def _symlink_loop(root: Path) -> None:
    (root / "train.jsonl").symlink_to(root / "train.jsonl")


NOT_A_FILE = {
    "a directory": (_directory, ["data.train_file", "train.jsonl is a directory, not a file"]),
    "a FIFO": (_fifo, ["data.train_file", "is a FIFO (named pipe), not a regular file", "write the data to "
                       "a regular file"]),
    "a symlink loop": (_symlink_loop, ["data.train_file", "is a symlink loop", "point the link at the real file"]),
}


@pytest.mark.parametrize("case", sorted(NOT_A_FILE))
def test_a_data_path_that_is_not_a_file_says_what_it_is(tmp_path, recorded, cache_dir, case):  # noqa: F811
    make, fragments = NOT_A_FILE[case]
    root = _data(tmp_path / "data", None)
    make(root)
    _refused(tmp_path, recorded, _args(root, cache_dir), fragments)


def test_a_data_root_that_is_a_symlink_loop_is_named(tmp_path, recorded, cache_dir):  # noqa: F811
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    _refused(tmp_path, recorded, _args(tmp_path / "loop", cache_dir), ["data.root", "is a symlink loop"])


def _without_root_read_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CLI run without root's power to read any file, so a mode-000 file really is unreadable.

    Tests run as root here, and root reads through chmod. Dropping CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the command (setpriv, util-linux) gives it an ordinary user's permission
    checks; the helper starts `sys.executable`, so that is pointed at a wrapper for this test only.
    """
    if os.geteuid() != 0:
        return  # an ordinary user cannot read a mode-000 file anyway
    setpriv = shutil.which("setpriv")
    drop = ["--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    if setpriv is None or subprocess.run([setpriv, *drop, "cat", str(probe)], capture_output=True).returncode == 0:
        pytest.skip("cannot drop root's read override here (setpriv missing or capabilities not droppable)")
    wrapper = tmp_path / "python-without-dac"
    wrapper.write_text(f'#!/bin/sh\nexec {setpriv} {" ".join(drop)} {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(wrapper))


def test_an_unreadable_data_file_gives_the_fix_not_a_traceback(tmp_path, recorded, cache_dir, monkeypatch):  # noqa: F811
    root = _data(tmp_path / "data", _line())
    (root / "train.jsonl").chmod(0)
    _without_root_read_override(tmp_path, monkeypatch)
    _refused(tmp_path, recorded, _args(root, cache_dir),
             ["train.jsonl cannot be read (permission denied)", "make it readable by the user running the trial"])


def test_more_eval_examples_than_the_eval_file_holds_is_refused(tmp_path, recorded, cache_dir):  # noqa: F811
    root = _data(tmp_path / "data", _line())  # validation.jsonl holds two records
    _refused(tmp_path, recorded, _args(root, cache_dir, "eval.num_examples=5"),
             ["eval.num_examples=5", "validation.jsonl (data.eval_file) has only 2 records",
              "set eval.num_examples=2 or less"])


def test_a_bom_file_with_a_huge_example_trains_and_counts_it_truncated(tmp_path, cache_dir):
    """Awkward but valid: a UTF-8 byte order mark (Excel's "UTF-8") is accepted, and a 5 MB source is
    cut to the token budget (before tokenizing, see test_data) and counted as truncated."""
    huge = "Doctor: and then? Patient: " + "the pain comes and goes " * 200_000
    root = _data(tmp_path / "data", b"\xef\xbb\xbf" + _line(id="huge", source=huge) + _line(id="b"))
    proc = run_cli([*_args(root, cache_dir), "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "completed", record.get("error")
    train = record["data"]["splits"]["train"]
    assert (train["records"], train["used"], train["truncated"], train["dropped"]) == (2, 2, 1, 0)
