"""Whole sweeps through Hydra with a cheap task (tests/sweep_app): resume, many workers on one study
(journal file and a real PostgreSQL server), failure limits, killed sweeps, the dashboard's view."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from src.config import PROJECT_ROOT
from src.sweeper import report
from src.sweeper import study as S
from tests.system import free_port, require, wait_http

APP = PROJECT_ROOT / "tests" / "sweep_app" / "app.py"
SPACE = ["x=interval(0,1)", "y=range(1,4)"]


def sweep(cwd: Path, storage: str, *args: str, sweep_dir: str = "multirun", wait: bool = True,
          timeout: float = 300) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    cmd = [sys.executable, str(APP), "--config-dir", str(PROJECT_ROOT / "conf"), "-m",
           f"hydra.sweep.dir={sweep_dir}", *args]
    env = {**os.environ, "PARETUNE_STUDY_STORAGE": storage, "PYTHONPATH": str(PROJECT_ROOT)}
    if not wait:
        # A shell without job control (CI running us in the background) starts children with SIGINT
        # ignored, and Python then never turns SIGINT into KeyboardInterrupt: restore the default.
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=S.open_storage(storage))


def check_study(study: optuna.Study, n: int) -> None:
    """What every finished study must show: n trials, unique numbers, none running, each recorded."""
    trials = study.get_trials()
    assert len(trials) == n
    assert sorted(t.number for t in trials) == list(range(n))
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for t in trials:
        record = json.loads(Path(t.user_attrs[S.RESULT_PATH]).read_text())
        assert record["status"] == t.user_attrs[S.STATUS]
        if t.state == TrialState.COMPLETE:
            assert t.values == [record["objectives"]["q"], record["objectives"]["c"]]
            assert t.user_attrs[S.METRICS]["q"] == record["objectives"]["q"]


def test_search_resumes_and_results_match_best_trials(tmp_path):
    storage = str(tmp_path / "studies.journal")
    first = sweep(tmp_path, storage, *SPACE, "hydra.sweeper.n_trials=4", "hydra.sweeper.study_name=demo",
                  "hydra.sweeper.sampler.seed=1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {t.number: (t.values, t.datetime_start) for t in load(storage, "demo").trials}
    again = sweep(tmp_path, storage, *SPACE, "hydra.sweeper.n_trials=6", "hydra.sweeper.study_name=demo",
                  "hydra.sweeper.sampler.seed=1", sweep_dir="multirun2")
    assert again.returncode == 0, again.stderr[-3000:]
    study = load(storage, "demo")
    check_study(study, 6)
    assert {t.number: (t.values, t.datetime_start) for t in study.trials[:4]} == before  # kept, not re-run
    assert sorted(p.name for p in (tmp_path / "multirun2").iterdir() if p.name.isdigit()) == ["4", "5"]
    assert study.metric_names == ["q", "c"]

    results = OmegaConf.to_container(OmegaConf.load(tmp_path / "multirun2" / report.RESULTS_FILE))
    assert isinstance(results, dict)
    assert [s["trial"] for s in results["solutions"]] == sorted(t.number for t in study.best_trials)
    for s in results["solutions"]:
        t = study.trials[s["trial"]]
        assert s["params"] == t.params and list(s["values"].values()) == t.values

    done = sweep(tmp_path, storage, *SPACE, "hydra.sweeper.n_trials=6", "hydra.sweeper.study_name=demo",
                 sweep_dir="multirun3")
    assert done.returncode == 0 and len(load(storage, "demo").trials) == 6  # nothing left to do


def test_default_study_name_is_stable_for_the_same_command(tmp_path):
    storage = str(tmp_path / "studies.journal")
    for i, n in enumerate((2, 3)):
        proc = sweep(tmp_path, storage, "x=choice(0.1,0.9)", f"hydra.sweeper.n_trials={n}", sweep_dir=f"m{i}")
        assert proc.returncode == 0, proc.stderr[-2000:]
    (summary,) = optuna.get_all_study_summaries(S.open_storage(storage))
    assert summary.study_name.startswith("search-") and summary.n_trials == 3


def test_grid_is_the_default_and_completes_rather_than_repeats(tmp_path):
    storage = str(tmp_path / "studies.journal")
    grid = ["hydra/sweeper=grid", "x=0.1,0.5", "y=1,2", "hydra.sweeper.study_name=g"]
    proc = sweep(tmp_path, storage, *grid)
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = load(storage, "g")
    check_study(study, 4)
    assert [t.params for t in study.trials] == [{"x": x, "y": y} for x in (0.1, 0.5) for y in (1, 2)]
    again = sweep(tmp_path, storage, *grid, sweep_dir="again")
    assert again.returncode == 0 and "4 of 4 grid cells are already completed" in again.stderr
    assert len(load(storage, "g").trials) == 4
    rerun = sweep(tmp_path, storage, *grid, "hydra.sweeper.rerun_completed=true", sweep_dir="rerun")
    assert rerun.returncode == 0 and len(load(storage, "g").trials) == 8


def test_failures_are_recorded_and_the_failure_limit_stops_the_sweep(tmp_path):
    storage = str(tmp_path / "studies.journal")
    ok = sweep(tmp_path, storage, "hydra/sweeper=grid", "x=0.2,0.9", "fail_above=0.5",
               "hydra.sweeper.study_name=f1", "hydra.sweeper.max_failure_rate=0.5")
    assert ok.returncode == 0, ok.stderr[-2000:]
    failed = [t for t in load(storage, "f1").trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs[S.ERROR] == "x=0.9 is above 0.5"
    assert failed[0].user_attrs[S.STATUS] == "failed"

    stop = sweep(tmp_path, storage, "hydra/sweeper=grid", "x=0.9,0.95,0.2", "fail_above=0.5",
                 "hydra.sweeper.study_name=f2", "hydra.sweeper.max_failure_rate=0.25",
                 "hydra.sweeper.max_batch_size=1", sweep_dir="stop")
    assert stop.returncode != 0
    assert "1 of the 3 trials this run planned failed" in stop.stderr and "max_failure_rate=25%" in stop.stderr
    assert "x=0.9 is above 0.5" in stop.stderr
    assert len(load(storage, "f2").trials) == 1  # stopped before the rest
    assert (tmp_path / "stop" / report.RESULTS_FILE).is_file()  # written even when the sweep stops


def test_bad_values_anywhere_in_the_sweep_stop_it_before_any_trial(tmp_path):
    storage = str(tmp_path / "studies.journal")
    proc = sweep(tmp_path, storage, "hydra/sweeper=grid", "x=0.1,0.2", "y=1,oops")
    assert proc.returncode != 0 and "nothing was run" in proc.stderr and "y=oops" in proc.stderr
    assert not list(tmp_path.glob("multirun/*/result.json"))
    bad = sweep(tmp_path, storage, "x=interval(0.5,0.1)")
    assert bad.returncode != 0 and "hydra.sweeper.params.x" in bad.stderr and "swap the bounds" in bad.stderr
    direction = sweep(tmp_path, storage, "x=interval(0,1)", "hydra.sweeper.direction=[minimize,minimize]")
    assert direction.returncode != 0 and "disagrees with the declared objectives" in direction.stderr
    url = sweep(tmp_path, storage, "x=interval(0,1)", "hydra.sweeper.storage=mongodb://h/x")
    assert url.returncode != 0 and "unsupported scheme" in url.stderr


def _concurrent(tmp_path: Path, storage: str, name: str, n: int) -> optuna.Study:
    args = [*SPACE, f"hydra.sweeper.n_trials={n}", f"hydra.sweeper.study_name={name}", "sleep_s=0.2"]
    procs = [sweep(tmp_path, storage, *args, sweep_dir=f"w{i}", wait=False) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    study = load(storage, name)
    check_study(study, n)
    per_worker = [len([d for d in (tmp_path / f"w{i}").iterdir() if d.name.isdigit()]) for i in range(2)]
    assert sum(per_worker) == n and min(per_worker) >= 1, per_worker  # both worked, no trial twice
    # x is continuous: a repeated parameter set would mean a trial was handed out twice
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == n
    return study


def test_two_workers_share_a_journal_file(tmp_path):
    _concurrent(tmp_path, str(tmp_path / "shared.journal"), "journal-2w", 10)


def test_two_workers_share_a_postgresql_study(tmp_path, pg):
    study = _concurrent(tmp_path, pg.url, "pg-2w", 10)
    # the server is shared by the session's tests: count this study's rows only
    rows = pg.psql("SELECT count(*) FROM trials t JOIN studies s ON t.study_id = s.study_id "
                   "WHERE s.study_name = 'pg-2w'", db="optuna")
    assert rows.strip() == "10"
    multirun = (tmp_path / "w0" / "multirun.yaml").read_text()
    assert "s3cret-canary" not in multirun and "paretune:***@" in multirun
    assert study.directions[0] == optuna.study.StudyDirection.MAXIMIZE


def _wait_running(storage: str, name: str, job_dir: Path, timeout_s: float = 60) -> None:
    """Until a trial is running with its parameters and its job has started: mid-trial, not mid-ask."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            running = [t for t in load(storage, name).trials if t.state == TrialState.RUNNING and t.params]
            if running and (job_dir / ".hydra").is_dir():
                time.sleep(0.5)
                return
        except KeyError:
            pass
        time.sleep(0.2)
    raise AssertionError("no trial started")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_sweep_resumes_and_retries_its_lost_trial_once(tmp_path, sig):
    storage = str(tmp_path / "studies.journal")
    args = ["x=choice(0.2,0.4)", "hydra.sweeper.n_trials=3", "hydra.sweeper.study_name=k", "sleep_s=60"]
    proc = sweep(tmp_path, storage, *args, wait=False)
    _wait_running(storage, "k", tmp_path / "multirun" / "0")
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    (lost,) = load(storage, "k").trials
    if sig == signal.SIGINT:  # the sweep marks its own trial on the way out
        assert lost.state == TrialState.FAIL and "interrupted" in lost.user_attrs[S.ERROR]
    else:
        assert lost.state == TrialState.RUNNING  # nobody could mark it: the lease tells

    resumed = sweep(tmp_path, storage, "x=choice(0.2,0.4)", "hydra.sweeper.n_trials=3",
                    "hydra.sweeper.study_name=k", "sleep_s=0", "hydra.sweeper.retry_stale=true", sweep_dir="resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = load(storage, "k")
    trials = study.trials
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[S.STALE] is True
    retries = [t for t in trials if t.user_attrs.get(S.RETRY_OF) == 0]
    assert len(retries) == 1 and retries[0].params == trials[0].params
    assert retries[0].state == TrialState.COMPLETE
    assert len(trials) == 4 and S.counted(trials) == 3  # the retry replaces the lost trial
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_optuna_dashboard_serves_the_study(tmp_path):
    storage = str(tmp_path / "studies.journal")
    assert sweep(tmp_path, storage, *SPACE, "hydra.sweeper.n_trials=3", "hydra.sweeper.study_name=dash").returncode == 0
    exe = Path(sys.executable).parent / "optuna-dashboard"
    if not exe.exists():
        require("optuna-dashboard", "`make setup` installs it")
    port = free_port()
    server = subprocess.Popen([str(exe), storage, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        studies = json.loads(wait_http(f"http://127.0.0.1:{port}/api/studies"))["study_summaries"]
        (dash,) = [s for s in studies if s["study_name"] == "dash"]
        detail = json.loads(wait_http(f"http://127.0.0.1:{port}/api/studies/{dash['study_id']}"))
        assert len(detail["trials"]) == 3 and detail["objective_names"] == ["q", "c"]
        assert all(t["state"] == "Complete" for t in detail["trials"])
        assert {t["number"] for t in detail["best_trials"]} == {t.number for t in load(storage, "dash").best_trials}
    finally:
        server.terminate()
        server.wait(timeout=10)
