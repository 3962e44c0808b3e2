"""Bad input to ``python -m analysis``, through the real command line: one line naming the problem and
the fix, a non-zero exit, no traceback unless --debug asks for it, and nothing already written (the
study's journal, its records, an earlier report) changed or created. Also: unreadable records are
reported, never silently dropped; report folders stay inside the reports folder; no storage
password reaches a report; the sweep table numbers trials as Optuna does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from analysis import ratios
from analysis.__main__ import folder_name
from src.callbacks import collect, fixed_overrides, format_table
from src.config import PROJECT_ROOT
from tests.conftest import TINY
from tests.report_study import STUDY, TRIALS, record, write_study

READ_ONLY = Path("/sys/paretune-analysis-test")  # sysfs refuses new folders, even to root


def _analysis(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PARETUNE_STUDY_STORAGE": str(cwd / "studies" / "paretune.journal"),
                "PARETUNE_REPORTS_DIR": str(cwd / "reports"), "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder under ``root``: a refused command must leave it equal."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """A recorded study (journal + records), an earlier report of it, a plain file and empty folders."""
    (tmp_path / "studies").mkdir()
    write_study(tmp_path / "sweep", str(tmp_path / "studies" / "paretune.journal"))
    earlier = tmp_path / "reports" / STUDY
    earlier.mkdir(parents=True)
    (earlier / "report.md").write_text("# an earlier report\n")
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "README.md").write_text("no markers here\n")
    cut = tmp_path / "cut"
    for n in (0, 1):  # records cut short by a crash mid-write
        (cut / str(n)).mkdir(parents=True)
        text = (tmp_path / "sweep" / str(n) / "result.json").read_text()
        (cut / str(n) / "result.json").write_text(text[: len(text) // 2])
    (tmp_path / "wrong_shape" / "0").mkdir(parents=True)
    (tmp_path / "wrong_shape" / "0" / "result.json").write_text('{"status": "completed", "trial": [1], "metrics": {}}')
    return tmp_path


J = "{tmp}/studies/paretune.journal"
# name: (args, fragments of the message, exit code). {tmp} is the test's folder.
CASES: dict[str, tuple[list[str], list[str], int]] = {
    "report --out under a file": (["report", "{tmp}/sweep", "--out", "{tmp}/a_file/report", "--no-png"],
                                  ["cannot write to {tmp}/a_file/report", "Not a directory", "give --out"], 1),
    "report --out in a read-only place": (["report", "{tmp}/sweep", "--out", str(READ_ONLY), "--no-png"],
                                          [f"cannot write to {READ_ONLY}", "give --out"], 1),
    "report bad --storage scheme": (["report", "--study", STUDY, "--storage", "mongodb://bob:pwQ9x@db/o"],
                                    ["--storage: unsupported scheme 'mongodb://'", "PARETUNE_STUDY_STORAGE",
                                     "postgresql://"], 2),
    "report mistyped --storage path": (["report", "--study", STUDY, "--storage", "{tmp}/studies/paretune.jounral"],
                                       ["--storage: no journal file at {tmp}/studies/paretune.jounral",
                                        "PARETUNE_STUDY_STORAGE"], 2),
    "report --storage a folder": (["report", "--study", STUDY, "--storage", "{tmp}/studies"],
                                  ["--storage: {tmp}/studies is not a journal file"], 2),
    "report missing sqlite database": (["report", "--study", STUDY, "--storage", "sqlite:///{tmp}/studies/o.db"],
                                       ["--storage: no SQLite database at {tmp}/studies/o.db"], 2),
    "report unknown study": (["report", "--study", "nope", "--storage", J],
                             ["no study named 'nope'", f"studies there: ['{STUDY}']", "--study"], 2),
    "report nothing to read": (["report"], ["give --study NAME", "sweep folders"], 2),
    "report empty folder": (["report", "{tmp}/empty"], ["no result.json under ['{tmp}/empty']"], 2),
    "report missing folder": (["report", "{tmp}/nowhere"], ["{tmp}/nowhere does not exist", "--study NAME"], 2),
    "report only unreadable records": (["report", "{tmp}/cut"],
                                       ["no readable result.json", "unreadable records: 2 (",
                                        "{tmp}/cut/0/result.json: not valid JSON (cut short or corrupted"], 2),
    "report negative --tolerance": (["report", "{tmp}/sweep", "--tolerance", "-1", "--cost", "cost/usd"],
                                    ["--tolerance must be a number >= 0", "got -1"], 2),
    "report nan --tolerance": (["report", "{tmp}/sweep", "--tolerance", "nan"], ["--tolerance must be a number"], 2),
    "report unmeasured --cost": (["report", "{tmp}/sweep", "--cost", "cost/none"],
                                 ["--cost 'cost/none': no trial of handmade measured it", "cost/train_s"], 2),
    "report unmeasured --quality": (["report", "--study", STUDY, "--storage", J, "--quality", "eval/bleu"],
                                    ["--quality 'eval/bleu': no trial of handmade measured it", "eval/rougeL"], 2),
    "compare unknown studies": (["compare", "nope_a", "nope_b", "--storage", J], ["no study named 'nope_a'"], 2),
    "compare bad --storage scheme": (["compare", STUDY, STUDY, "--storage", "redis://h/0"],
                                     ["--storage: unsupported scheme 'redis://'"], 2),
    "compare mistyped --storage-b": (["compare", STUDY, STUDY, "--storage", J, "--storage-b", "{tmp}/typo.journal"],
                                     ["--storage-b: no journal file at {tmp}/typo.journal"], 2),
    "compare --out under a file": (["compare", "{tmp}/sweep", "{tmp}/sweep", "--out", "{tmp}/a_file/c", "--no-png"],
                                   ["cannot write to {tmp}/a_file/c", "give --out"], 1),
    "ratios malformed result.json": (["ratios", "{tmp}/cut", "--keys", "lora.r", "--reference", "lora.r=8"],
                                     ["no completed trial under", "unreadable records: 2 (",
                                      "{tmp}/cut/1/result.json: not valid JSON"], 2),
    "ratios record of the wrong shape": (["ratios", "{tmp}/wrong_shape", "--keys", "lora.r", "--reference", "lora.r=8"],
                                         ["unreadable records: 1 (", "'trial' is not a mapping"], 2),
    "ratios missing folder": (["ratios", "{tmp}/nowhere", "--keys", "lora.r", "--reference", "lora.r=8"],
                              ["{tmp}/nowhere does not exist"], 2),
    "ratios missing --readme": (["ratios", "{tmp}/sweep", "--keys", "lora.r", "--reference", "lora.r=8",
                                 "--readme", "{tmp}/READ.md"], ["--readme {tmp}/READ.md: cannot read it"], 2),
    "ratios --readme without markers": (["ratios", "{tmp}/sweep", "--keys", "lora.r", "--reference", "lora.r=8",
                                         "--readme", "{tmp}/README.md"], ["has no <!-- ratios:begin -->"], 2),
    "ratios --readme a folder": (["ratios", "{tmp}/sweep", "--keys", "lora.r", "--reference", "lora.r=8",
                                  "--readme", "{tmp}/empty"], ["--readme {tmp}/empty: cannot read it"], 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line_and_changes_nothing(study, case):
    args, fragments, code = CASES[case]
    before = _snapshot(study)
    proc = _analysis([a.replace("{tmp}", str(study)) for a in args], cwd=study)
    assert proc.returncode == code, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment.replace("{tmp}", str(study)) in proc.stderr, (fragment, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "pwQ9x" not in proc.stderr + proc.stdout  # a URL's password is never quoted back
    assert _snapshot(study) == before  # no report, no journal, no lock file, nothing overwritten
    assert not READ_ONLY.exists()


def test_debug_shows_the_traceback(study):
    proc = _analysis(["report", str(study / "sweep"), "--out", str(study / "a_file" / "r"), "--no-png", "--debug"],
                     cwd=study)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "NotADirectoryError" in proc.stderr


def test_a_cut_short_record_is_reported_not_dropped(study, tmp_path):
    """One good and one truncated record: the report says 1 completed AND names the unreadable one."""
    folder = tmp_path / "half"
    (folder / "0").mkdir(parents=True)
    (folder / "0" / "result.json").write_bytes((study / "sweep" / "0" / "result.json").read_bytes())
    (folder / "1").mkdir()
    (folder / "1" / "result.json").write_bytes((study / "cut" / "1" / "result.json").read_bytes())
    out = tmp_path / "report"
    proc = _analysis(["report", str(folder), "--out", str(out), "--no-png"], cwd=study)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = f"Unreadable records, left out: 1 ({folder / '1' / 'result.json'}: not valid JSON"
    assert line in proc.stdout and "Trials: 1 (1 completed)" in proc.stdout
    assert line in (out / "report.md").read_text()
    assert line in (out / "report.html").read_text()
    assert f"unreadable records, left out: 1 ({folder / '1' / 'result.json'}" in proc.stderr
    proc = _analysis(["compare", str(folder), str(folder), "--out", str(tmp_path / "cmp"), "--no-png"], cwd=study)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cmp" / "compare.md").read_text().count(line) == 2
    # ratios warns the same way and still writes its table from what it could read
    proc = _analysis(["ratios", str(folder), "--keys", "lora.r", "--reference", "lora.r=8"], cwd=study)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 8 | 1 |" in proc.stdout and "unreadable records, left out: 1 (" in proc.stderr


def _renamed(records_from: Path, to: Path, name: str) -> Path:
    for path in sorted(records_from.glob("*/result.json")):
        r = json.loads(path.read_text())
        r["trial"]["study"]["name"] = name
        (to / path.parent.name).mkdir(parents=True)
        (to / path.parent.name / "result.json").write_text(json.dumps(r))
    return to


@pytest.mark.parametrize("kind", ["dots", "slash"])
def test_a_study_name_cannot_put_its_report_outside_reports(study, tmp_path, kind):
    # "../" enough times to climb to / from any reports folder, then down to this test's folder;
    # an absolute name would replace the reports folder in a path join.
    escape = tmp_path / "escaped"
    name = "../" * 40 + str(escape).lstrip("/") if kind == "dots" else str(escape)
    records = _renamed(study / "sweep", tmp_path / "renamed", name)
    reports = study / "reports"
    before = set(reports.rglob("*"))
    proc = _analysis(["report", str(records), "--no-png"], cwd=study)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not escape.exists()
    made = [p for p in set(reports.rglob("report.md")) - before]
    assert len(made) == 1 and made[0].parent.parent == reports, made
    assert f"report: {made[0].parent / 'report.html'}" in proc.stdout


def test_folder_names_of_odd_study_names():
    assert folder_name("..") == "__" and folder_name(".") == "_" and folder_name("a/b") == "a_b"
    assert folder_name("/etc") == "_etc" and folder_name("rank_lr") == "rank_lr"
    assert folder_name("lr=1e-3,r=8") == "lr=1e-3,r=8"


# A database password with every character a URL parser trips on; each piece is distinctive, so a
# password masked only up to its first "@" or "/" still shows a piece and fails the test.
PIECES = ["pwA1", "pwB2", "pwC3", "pwD4", "pwE5", "pwF6"]
PASSWORD = "pwA1/pwB2#pwC3@pwD4:pwE5%41pwF6"
URL = f"postgresql://bob:{PASSWORD}@db.example:5432/optuna"


def _leaky_records(root: Path) -> Path:
    """Records as an older version wrote them: the storage URL in overrides, params and an error."""
    for number, status, params, rouge, train_s, error in TRIALS:
        r: dict[str, Any] = record(number, status, params, rouge, train_s, error and f"{error} ({URL})", root)
        r["trial"]["overrides"] += [f"paths.study_storage={URL}", f"hydra.sweeper.storage={URL}"]
        if number % 2:  # params from the overrides (records without the study's params)
            del r["trial"]["study"]["params"]
        (root / str(number)).mkdir(parents=True)
        (root / str(number) / "result.json").write_text(json.dumps(r))
    return root


def test_no_storage_password_in_any_report_file(tmp_path):
    """report.write (report.md, report.html, trials.csv, recommended/*.yaml) and compare.write
    (compare.md, compare.html) show overrides, params, errors and sources: none may hold the password."""
    records = _leaky_records(tmp_path / "sweep")
    out = tmp_path / "report"
    proc = _analysis(["report", str(records), "--out", str(out), "--no-png", "--no-quality-floor"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmp_ = _analysis(["compare", str(records), str(records), "--out", str(tmp_path / "cmp"), "--no-png"],
                     cwd=tmp_path)
    assert cmp_.returncode == 0, cmp_.stderr[-3000:]
    written = [p for p in [*out.rglob("*"), *(tmp_path / "cmp").rglob("*")] if p.is_file()]
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {"report/report.md", "report/report.html", "report/trials.csv", "report/recommended/knee.yaml",
            "cmp/compare.md", "cmp/compare.html"} <= names
    assert "postgresql://bob:***@db.example" in (out / "trials.csv").read_text()  # it was there, masked
    for text in [proc.stdout, proc.stderr, cmp_.stdout, cmp_.stderr, *(p.read_text() for p in written), *names]:
        assert not [piece for piece in PIECES if piece in text]


def test_ratios_table_keeps_no_password():
    """ratios' rows are override values: a storage key among --keys must not show its password."""
    r = {"status": "completed", "trial": {"overrides": [f"paths.study_storage={URL}", "quant=none"]}}
    assert ratios.setting(r, ["paths.study_storage", "quant"]) == ("postgresql://bob:***@db.example:5432/optuna",
                                                                   "none")


def _rec(job: int, trial: int | None, status: str = "completed", **extra: Any) -> dict[str, Any]:
    study = {"name": "s", "trial": trial, "params": {}} if trial is not None else None
    return {"status": status, "trial": {"job_num": job, "overrides": [f"lora.r={2 ** (job + 1)}"], "study": study},
            "metrics": {"eval/rougeL": 0.1 + job / 100}, "gains": {}, **extra}


def test_sweep_table_numbers_trials_as_optuna_does():
    """A resumed study: jobs 0 and 1 of this run are Optuna trials 2 and 3. Without a study (Hydra's
    basic sweeper), the job number is all there is."""
    rows = format_table([_rec(0, 2), _rec(1, 3), _rec(2, None)]).splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["2", "3", "2"]
    assert rows[0].split()[1:3] == ["completed", "lora.r=2"]


def test_sweep_table_survives_an_unreadable_record_and_masks_passwords(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "result.json").write_text(json.dumps(_rec(0, 0)))
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "result.json").write_text('{"status": "compl')
    leaky = _rec(2, 2, status="failed", error={"message": f"cannot open {URL}"})
    leaky["trial"]["overrides"].append(f"paths.study_storage={URL}")
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "result.json").write_text(json.dumps(leaky))
    table = format_table(collect(tmp_path))
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].split()[0] == "unreadable:", table
    assert lines[1].split()[:2] == ["0", "completed"] and lines[3].split()[:2] == ["2", "failed:"]
    assert "postgresql://bob:***@" in table and not [p for p in PIECES if p in table]


def test_sweep_table_of_a_resumed_study_through_the_cli(tmp_path, data_root, cache_dir):
    """A grid lora.r=2,4 on a study whose cell r=4 is already done: the one job left (Hydra job 0)
    is Optuna trial 1, and the table printed at the end says 1."""
    import optuna
    from optuna.distributions import IntDistribution

    from src.sweeper import study as S

    storage = str(tmp_path / "studies" / "paretune.journal")
    old = optuna.create_study(study_name="resumed", storage=S.open_storage(storage),
                              directions=["maximize", "minimize"])
    old.set_metric_names(["eval/rougeL", "cost/train_s"])
    old.add_trial(optuna.trial.create_trial(params={"lora.r": 4}, distributions={"lora.r": IntDistribution(2, 4)},
                                            values=[0.1, 1.0]))
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", *TINY, "lora.r=2,4", "logger=none", f"data.root={data_root}",
         f"paths.cache_dir={cache_dir}", "hydra.sweeper.study_name=resumed", f"hydra.sweep.dir={tmp_path / 'm'}"],
        cwd=tmp_path, env={**os.environ, "PARETUNE_STUDY_STORAGE": storage, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(next((tmp_path / "m").glob("*/result.json")).read_text())
    assert record["trial"]["job_num"] == 0 and record["trial"]["study"]["trial"] == 1
    table = proc.stdout[proc.stdout.index("1 trials in"):].splitlines()
    assert table[1].split()[0] == "#" and table[2].split()[0] == "1", table


@pytest.mark.parametrize("given", ["--storage", "PARETUNE_STUDY_STORAGE"])
def test_a_refused_database_never_prints_its_password(study, given):
    """Port 1 refuses at once; the driver, unable to parse the raw password, quotes a piece of it."""
    url = URL.replace("db.example:5432", "127.0.0.1:1")
    before = _snapshot(study)
    args, env = (["--storage", url], None) if given == "--storage" else ([], {"PARETUNE_STUDY_STORAGE": url})
    proc = _analysis(["report", "--study", STUDY, *args], cwd=study, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--storage: cannot open postgresql://bob:***@127.0.0.1:1/optuna" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [piece for piece in PIECES if piece in proc.stdout + proc.stderr], proc.stderr
    assert _snapshot(study) == before


def test_sweep_table_shows_only_the_varied_overrides_and_the_intervals():
    """Overrides every trial shares (logger=none data.root=...) are printed once, not on each row,
    so the numbers stay on screen; quality cells carry their 95% interval."""
    recs = [_rec(j, j) for j in range(2)]
    for r in recs:
        r["trial"]["overrides"] += ["logger=none", "data.root=/very/long/path/to/the/data"]
        r["intervals"] = {"eval/rougeL": [0.05, 0.2]}
    table = format_table(recs)
    assert "logger=none" not in table and "/very/long/path" not in table
    rows = table.splitlines()[1:]
    assert rows[0].split()[2] == "lora.r=2" and rows[1].split()[2] == "lora.r=4"
    assert "0.1 [0.05, 0.2]" in rows[0]
    assert fixed_overrides(recs) == "logger=none data.root=/very/long/path/to/the/data"
    assert fixed_overrides(recs[:1]) == ""  # one trial: nothing to factor out
