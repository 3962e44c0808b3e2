"""Reliability and security defects, each tried for real through the command line: the PostgreSQL
advisory lock, storage passwords that must never reach a file, a name, an output or the study,
studies that must not be damaged by a resume or a torn journal line, and exit codes that tell a
script the truth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from src import redact
from src.evaluate import rouge
from src.sweeper import journal as J
from src.sweeper import study as S
from tests.conftest import TINY, run_cli


def _journal(path: Path) -> optuna.storages.JournalStorage:
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def _trial_args(data_root: Path, cache_dir: Path) -> list[str]:
    return [*TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}", "logger=none"]


def _popen(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    # A shell without job control (CI run in the background) starts children with SIGINT ignored, and
    # Python then never turns SIGINT into KeyboardInterrupt: the Ctrl-C test needs the default back.
    return subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=cwd, text=True,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# ---- 1. the advisory lock -------------------------------------------------------------------------
def test_workers_in_different_folders_are_serialised_by_the_postgresql_advisory_lock(tmp_path, pg, data_root,
                                                                                      cache_dir):
    """Two workers, each started in its own folder with its own sweep dir, against one study: while the
    test holds the study's advisory lock neither can ask a trial; once it lets go they share exactly
    n_trials. No lock file is made anywhere (it used to be a folder named after the URL)."""
    import sqlalchemy as sa

    name = "lock-two-folders"
    args = ["-m", *_trial_args(data_root, cache_dir), "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
            "lora.r=choice(2,4)", f"hydra.sweeper.storage={pg.url}", f"hydra.sweeper.study_name={name}"]
    engine = sa.create_engine(pg.url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": S.ask_lock_key(name)})
        workers = [_popen([*args, f"hydra.sweep.dir={tmp_path / f'sweep{i}'}"], tmp_path / f"cwd{i}")
                   for i in range(2)]
        deadline = time.monotonic() + 120
        waiting = 0
        while time.monotonic() < deadline and waiting < 2:
            waiting = int(pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                                  f"AND classid = 0 AND objid = {S.ask_lock_key(name)}"))
            time.sleep(0.3)
        assert waiting == 2, [w.poll() for w in workers]
        time.sleep(2)  # had anything else serialised them, a trial would be asked meanwhile
        assert optuna.load_study(study_name=name, storage=pg.url).trials == []
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": S.ask_lock_key(name)})
    engine.dispose()
    outs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outs]
    trials = optuna.load_study(study_name=name, storage=pg.url).trials
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    made = [p.name for p in tmp_path.rglob("*") if "postgresql" in p.name or p.name.endswith(".lock")]
    assert made == []


# ---- 2. passwords --------------------------------------------------------------------------------
PASSWORD = 'Kanary1/Pword22#Secret3@Retain4:Keyed5%Finale6 Spaced7"Quoted8'
PIECES = ["Kanary1", "Pword22", "Secret3", "Retain4", "Keyed5", "Finale6", "Spaced7", "Quoted8"]


def _url(pg, db: str = "kanarydb", port: int | None = None) -> str:
    # As SQLAlchemy takes it: "/", "#" and ":" as typed, "@" and "%" percent-encoded.
    typed = PASSWORD.replace("%", quote("%")).replace("@", quote("@"))
    return f"postgresql://kanary:{typed}@127.0.0.1:{port or pg.port}/{db}"


def _leaks(text: str) -> list[str]:
    return [p for p in PIECES if p in text]


def _scan(root: Path) -> list[str]:
    found = []
    for path in root.rglob("*"):
        found += [f"name {path}: {p}" for p in _leaks(str(path.relative_to(root)))]
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {p}" for p in PIECES if p.encode() in data]
    return found


def test_a_password_with_every_special_character_reaches_no_file_name_output_or_study(tmp_path, pg, data_root,
                                                                                        cache_dir):
    pg.psql("DO $$ BEGIN CREATE USER kanary; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    pg.psql(f"ALTER USER kanary PASSWORD '{PASSWORD}'")
    if "kanarydb" not in pg.psql("SELECT datname FROM pg_database"):
        pg.psql("CREATE DATABASE kanarydb OWNER kanary")
    url = _url(pg)
    assert redact.mask_url(url) == f"postgresql://kanary:***@127.0.0.1:{pg.port}/kanarydb"
    base = ["-m", *_trial_args(data_root, cache_dir)[:-1], "lora.r=2"]  # W&B offline: its files are scanned too
    runs = {  # every way a storage URL is given; quoted, since "#" is not in Hydra's unquoted grammar
        "sweeper storage": ([f"hydra.sweeper.storage='{url}'", "hydra.sweeper.study_name=via-sweeper"], {}),
        "paths.study_storage": ([f"paths.study_storage='{url}'", "hydra.sweeper.study_name=via-paths"], {}),
        "environment": (["hydra.sweeper.study_name=via-env"], {"PARETUNE_STUDY_STORAGE": url}),
    }
    outputs = []
    for i, (how, (extra, env)) in enumerate(runs.items()):
        proc = run_cli([*base, *extra, f"hydra.sweep.dir={tmp_path / 'sweeps' / str(i)}"], cwd=tmp_path, env=env)
        assert proc.returncode == 0, (how, proc.stderr[-3000:])
        outputs += [proc.stdout, proc.stderr]
    # Unquoted, Hydra's grammar refuses the "#" and prints the override; a server that is not there.
    for extra in ([f"hydra.sweeper.storage={url}"], [f"hydra.sweeper.storage='{_url(pg, port=1)}'"]):
        proc = run_cli([*base, *extra, f"hydra.sweep.dir={tmp_path / 'refused'}"], cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "kanary:***@" in proc.stderr
        outputs += [proc.stdout, proc.stderr]
    report = subprocess.run([sys.executable, "-m", "analysis", "report", "--study", "via-sweeper", "--storage", url,
                             "--out", str(tmp_path / "report"), "--no-png"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "report" / "report.html").exists() and list((tmp_path / "report").rglob("*.yaml"))
    outputs += [report.stdout, report.stderr]

    assert _scan(tmp_path) == []
    assert [_leaks(o) for o in outputs if _leaks(o)] == []
    storage = S.open_storage(url)
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        attrs = json.dumps([study.user_attrs, storage.get_study_system_attrs(study._study_id),  # noqa: SLF001
                            [[t.user_attrs, t.system_attrs, t.params] for t in study.trials]], default=str)
        assert _leaks(attrs) == [], summary.study_name
    overrides = optuna.load_study(study_name="via-paths", storage=storage).trials[0].user_attrs["overrides"]
    assert any(o.startswith("paths.study_storage=") and "kanary:***@" in o for o in overrides)  # masked, kept


@pytest.mark.parametrize("url, masked", [
    ("postgresql://u:p/w#x:y%25z@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u:raw@at@h/db", "postgresql://u:***@h/db"),  # a raw "@" leaves no tail behind
    ("postgresql+psycopg2://u:pw@h/db?sslmode=require", "postgresql+psycopg2://u:***@h/db?sslmode=require"),
    ("postgresql://h/db?user=u&password=s3cret", "postgresql://h/db?user=u&password=***"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("/a/journal/path", "/a/journal/path"),
])
def test_mask_url_masks_what_sqlalchemy_reads_as_the_password(url, masked):
    assert redact.mask_url(url) == masked


@pytest.fixture
def no_secrets():
    redact.forget()
    yield
    redact.forget()


def test_a_remembered_password_is_masked_outside_a_url_too(no_secrets):
    redact.remember("postgresql://u:Zq%2Fsecret-9@h/db")
    assert redact.scrub_text("auth failed for Zq/secret-9 and Zq%2Fsecret-9") == "auth failed for *** and ***"
    # A raw "@" makes the driver read the password's tail as the host, and quote it in its error.
    redact.remember("postgresql://u:first-part@tail-part@127.0.0.1:1/db")
    assert redact.scrub_text('could not translate host name "tail-part@127.0.0.1"') == \
        'could not translate host name "***@127.0.0.1"'


# ---- 3. resuming a study under other objective names ----------------------------------------------
def _study_with_one_trial(path: Path, name: str, dist: object, value: object) -> optuna.Study:
    study = optuna.create_study(storage=_journal(path), study_name=name, directions=["maximize", "minimize"])
    study.set_metric_names(["eval/rougeL", "cost/train_s"])
    study.add_trial(create_trial(params={_KEY[name]: value}, values=[0.2, 30.0], distributions={_KEY[name]: dist}))
    return study


_KEY = {"named": "lora.r", "categorical": "train.scheduler", "searched": "lora.r"}


def _refused_resume(tmp_path: Path, data_root: Path, args: list[str], fragments: list[str]) -> None:
    journal = tmp_path / "studies" / "paretune.journal"
    before = journal.read_bytes()
    proc = run_cli(["-m", *TINY, f"data.root={data_root}", "logger=none", *args,
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr[-3000:])
    assert journal.read_bytes() == before  # nothing asked, nothing relabelled, no trial left RUNNING
    assert not list(tmp_path.rglob("worker.log"))


def test_resuming_under_other_objective_names_is_refused(tmp_path, data_root):
    _study_with_one_trial(tmp_path / "studies" / "paretune.journal", "named", IntDistribution(1, 64), 8)
    _refused_resume(tmp_path, data_root, ["lora.r=2", "hydra.sweeper.study_name=named",
                                          "objectives=[{name: eval/rouge1, direction: maximize},"
                                          "{name: cost/train_s, direction: minimize}]"],
                    ["study 'named' records the objectives ['eval/rougeL', 'cost/train_s']",
                     "would relabel", "hydra.sweeper.study_name"])


def test_changing_a_categorical_in_a_named_study_is_refused_before_any_trial(tmp_path, data_root):
    path = tmp_path / "studies" / "paretune.journal"
    _study_with_one_trial(path, "categorical", CategoricalDistribution(["cosine"]), "cosine")
    _refused_resume(tmp_path, data_root, ["train.scheduler=cosine,linear", "hydra.sweeper.study_name=categorical"],
                    ["already has train.scheduler as the choices ['cosine']", "['cosine', 'linear']",
                     "hydra.sweeper.study_name=<new name>"])
    _study_with_one_trial(path, "searched", CategoricalDistribution([2, 4]), 2)
    _refused_resume(tmp_path, data_root, ["hydra/sweeper=optuna", "lora.r=choice(2,4,8)",
                                          "hydra.sweeper.study_name=searched"],
                    ["already has lora.r as the choices [2, 4]"])


def test_a_named_grid_study_grows_when_a_value_is_added(tmp_path, data_root, cache_dir):
    """lora.r=2,4, then lora.r=2,4,8 under the same name: the second run skips 2 and 4 and runs 8 (Optuna
    used to refuse the new value space with a traceback and leave the trial RUNNING)."""
    common = ["-m", *_trial_args(data_root, cache_dir), "hydra.sweeper.study_name=grows"]
    first = run_cli([*common, "lora.r=2,4", f"hydra.sweep.dir={tmp_path / 's1'}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli([*common, "lora.r=2,4,8", f"hydra.sweep.dir={tmp_path / 's2'}"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 of 3 grid cells are already completed" in second.stderr
    study = optuna.load_study(study_name="grows", storage=S.open_storage(str(tmp_path / "studies" /
                                                                              "paretune.journal")))
    assert sorted((t.params["lora.r"], t.state.name) for t in study.trials) == [(2, "COMPLETE"), (4, "COMPLETE"),
                                                                                 (8, "COMPLETE")]


# ---- 4. a journal line cut short -----------------------------------------------------------------
def test_a_torn_journal_line_is_cut_off_before_the_next_sweep_appends(tmp_path, data_root, cache_dir):
    path = tmp_path / "studies" / "paretune.journal"
    _study_with_one_trial(path, "named", IntDistribution(1, 64), 8)
    torn = b'{"op_code":5,"worker_id":"dead-worker","trial_id":0,"us'
    with open(path, "ab") as fh:
        fh.write(torn)
    proc = run_cli(["-m", *_trial_args(data_root, cache_dir), "lora.r=2", "hydra.sweeper.study_name=after",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cut off before appending" in proc.stderr
    J.check(path)  # every line readable
    storage = _journal(path)
    assert optuna.load_study(study_name="named", storage=storage).trials[0].state == TrialState.COMPLETE
    assert optuna.load_study(study_name="after", storage=storage).trials[0].state == TrialState.COMPLETE
    assert [p.read_bytes() for p in path.parent.glob("paretune.journal.torn-*")] == [torn]


def test_a_journal_damaged_in_the_middle_is_refused_with_the_repair_command(tmp_path, data_root):
    path = tmp_path / "studies" / "paretune.journal"
    _study_with_one_trial(path, "named", IntDistribution(1, 64), 8)
    lines = path.read_bytes().splitlines(keepends=True)
    # What an append landing on a torn line made: half an operation, then a whole one, on one line.
    path.write_bytes(b"".join(lines[:-1]) + b'{"op_code":5,"wor' + lines[-1])
    proc = run_cli(["-m", *TINY, f"data.root={data_root}", "logger=none", "lora.r=2",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"journal {path} is damaged at line {len(lines)}" in proc.stderr
    assert f"python -m src.sweeper.journal --repair {path}" in proc.stderr
    fix = subprocess.run([sys.executable, "-m", "src.sweeper.journal", "--repair", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert fix.returncode == 0 and "1 damaged line(s) recovered" in fix.stdout, fix.stderr
    assert b"".join(lines) == path.read_bytes()  # the whole operation at the end of the line was kept
    assert optuna.load_study(study_name="named", storage=_journal(path)).trials[0].values == [0.2, 30.0]


# ---- 8 and 10. exit codes of a single trial ----------------------------------------------------------
def test_a_failed_single_trial_exits_non_zero_with_its_record(tmp_path, data_root, cache_dir):
    proc = run_cli([*_trial_args(data_root, cache_dir), "lora.target_modules=[no_such_layer]",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "failed" and "no_such_layer" in record["error"]["message"]


def test_ctrl_c_of_a_single_trial_records_it_interrupted_without_a_traceback(tmp_path, data_root, cache_dir):
    run = tmp_path / "run"
    proc = _popen([*_trial_args(data_root, cache_dir), "train.max_steps=100000", f"hydra.run.dir={run}"], tmp_path)
    deadline = time.monotonic() + 120
    while not (run / "worker.log").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # the worker is importing or training
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # the run's threads' stacks, to stderr: where it waits
        time.sleep(2)
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"no exit within 120 s of SIGINT; the run's stacks:\n{err[-6000:]}") from None
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted" in err
    record = json.loads((run / "result.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "Interrupted"
    alive = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).endswith(str(run))]
    assert alive == []  # no worker left training


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# ---- 6. ROUGE in every script --------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "患者左膝肿胀，自马拉松以来。",          # Chinese
    "患者は毎晩三時に目が覚める。",          # Japanese
    "Пациент жалуется на боль в колене.",   # Russian
    "المريض يشكو من ألم في الركبة",          # Arabic
    "Ο ασθενής έχει πόνο στο γόνατο.",       # Greek
    "रोगी के घुटने में दर्द है।",               # Hindi: vowel signs stay inside their words
])
def test_rouge_scores_an_exact_summary_1_in_any_script(text):
    scores, per_example = rouge([text], [text])
    assert scores == {k: 1.0 for k in scores} and per_example == [scores]
    assert rouge(["x y z"], [text])[0]["eval/rougeL"] == 0.0
    # Half the text: partly right. (Bare consonants without their vowel signs would match in full.)
    assert 0.0 < rouge([text[: len(text) // 2]], [text])[0]["eval/rouge1"] < 1.0


def test_combining_marks_stay_inside_their_word():
    from src.evaluate import unicode_words

    assert unicode_words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert unicode_words("患者abc中") == ["患", "者", "abc", "中"]
    assert unicode_words("ﬁnding x_y") == ["finding", "x", "y"]


def test_rouge_on_english_is_what_rouge_score_itself_gives():
    from rouge_score import rouge_scorer

    pred = ["Left knee swelling after running the marathon; no allergies."]
    ref = ["Swollen left knee since the marathon. Allergies: none known."]
    ours = rouge(pred, ref)[0]["eval/rougeL"]
    theirs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref[0], pred[0])["rougeL"].fmeasure
    assert ours == pytest.approx(theirs, abs=1e-12) and ours > 0


def test_records_keep_config_values_that_share_letters_with_the_password(no_secrets):
    """Printed text masks every piece of a password, but a record or config changes only strings that
    hold a URL: the worker must run the config it was given."""
    redact.remember("postgresql://optuna:optuna@localhost/optuna")
    redact.remember("postgresql://u:hunter2/tcmalloc@h/db")
    config = {"paths": {"cache_dir": "/home/u/optuna-runs/.cache", "study_storage":
                        "postgresql://optuna:optuna@localhost/optuna"},
              "cpu": {"allocator": "tcmalloc"}, "packages": {"optuna": "5.0.0"}}
    assert redact.scrub(config) == {**config, "paths": {**config["paths"],
                                                        "study_storage": "postgresql://optuna:***@localhost/optuna"}}
    assert "tcmalloc" not in redact.scrub_text("auth failed: hunter2/tcmalloc")


def test_a_password_with_a_space_or_a_quote_is_masked(no_secrets):
    url = 'postgresql://u:pa ss"wo\'rd@h:5432/db'
    redact.remember(f"hydra.sweeper.storage='{url}'")
    assert redact.mask_url(url) == "postgresql://u:***@h:5432/db"
    assert "pa ss" not in redact.scrub_text(f"cannot open {url}: refused")
