"""Pruning across processes (src/sweeper/pruning.py), in the plain Hydra app (tests/plain_app, task
``curve``): each job reports its loss curve to its own trial through the study's storage and asks the
pruner. Grids and searches, one and two objectives, in-memory, journal and PostgreSQL storage, and
two workers sharing one study."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.study import StudyDirection
from optuna.trial import TrialState

from src.sweeper import pruning
from src.sweeper import study as S
from tests.test_plain_app import TASK, results, run, storage_args

STEPS = 6
# the median pruner (the curve app's): 2 trials run to the end first, none is pruned before step 1
MEDIAN = ["hydra.sweeper.pruner.n_startup_trials=2", "hydra.sweeper.pruner.n_warmup_steps=1"]
PRUNERS = ["none", "median", "percentile", "successive_halving", "hyperband", "wilcoxon", "threshold", "patient"]


def loss(x: float, step: int) -> float:
    """What the curve task reports at ``step`` (tests/plain_app/task.py)."""
    return (x * x + 1) * (1 + 1 / (step + 1))


def _study(tmp_path: Path, url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=S.open_storage(url))


@pytest.mark.parametrize("storage", ["memory", "journal", "postgresql"])
def test_a_grid_prunes_the_trials_whose_curve_is_worse_than_the_median(tmp_path, storage, request):
    args = storage_args(storage, tmp_path, request, "curve")
    run(tmp_path, "curve", "-m", "x=0,1,4,0.5,3,5", *MEDIAN, *args)
    out = results(tmp_path)
    # median pruner, 2 startup trials, 1 warm-up step: x=4, 3 and 5 are worse than the median at step 1
    assert out["trials"] == {"complete": 3, "pruned": 3}
    assert out["pruned"] == [{"trial": 2, "step": 1}, {"trial": 4, "step": 1}, {"trial": 5, "step": 1}]
    assert out["best_params"] == {"x": 0} and out["best_value"] == pytest.approx(loss(0, STEPS - 1))
    if storage == "memory":
        return
    url, name = args[0].split("=", 1)[1], args[1].split("=", 1)[1]
    trials = sorted(_study(tmp_path, url, name).trials, key=lambda t: t.number)
    for t in trials:
        x = t.params["x"]
        steps = range(STEPS) if t.state == TrialState.COMPLETE else range(2)
        assert t.intermediate_values == pytest.approx({s: loss(x, s) for s in steps})
        assert t.user_attrs[S.STATUS] == ("completed" if t.state == TrialState.COMPLETE else "pruned")
        assert not any(o.startswith(pruning.ENV_OVERRIDE) for o in t.user_attrs[S.OVERRIDES])
    # the same command resumes: completed and pruned cells alike are not run again
    again = run(tmp_path, "curve", "-m", "x=0,1,4,0.5,3,5", *MEDIAN, *args)
    assert "6 of 6 grid cells are already completed (or pruned)" in again.stdout
    assert len(_study(tmp_path, url, name).trials) == 6


def test_without_a_pruner_every_trial_runs_to_its_end_and_reports_nothing(tmp_path):
    journal = tmp_path / "s.journal"
    run(tmp_path, "curve", "-m", "x=0,1,4,5", "hydra/sweeper/pruner=none", f"hydra.sweeper.storage={journal}",
        "hydra.sweeper.study_name=nopruner")
    study = _study(tmp_path, str(journal), "nopruner")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert all(t.intermediate_values == {} for t in study.trials)


@pytest.mark.parametrize("storage", ["memory", "journal"])
def test_a_multi_objective_search_prunes_on_the_first_objective_only(tmp_path, storage, request):
    """Two objectives (loss, and |x| as a cost): a trial is pruned for its loss curve, never for its
    cost; pruned trials have no values, and the front holds completed trials only."""
    args = storage_args(storage, tmp_path, request, "curve2")
    run(tmp_path, "curve", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=3", "hydra.sweeper.n_trials=12", "hydra.sweeper.direction=[minimize,minimize]",
        "x=interval(-5,5)", "objectives=2", *MEDIAN, *args)
    out = results(tmp_path)
    assert out["trials"]["pruned"] >= 3 and out["trials"]["complete"] + out["trials"]["pruned"] == 12
    assert all(p["step"] == 1 for p in out["pruned"])
    front = {s["trial"] for s in out["solutions"]}
    assert not front & {p["trial"] for p in out["pruned"]}
    if storage == "journal":
        url, name = args[0].split("=", 1)[1], args[1].split("=", 1)[1]
        for t in _study(tmp_path, url, name).trials:
            if t.state == TrialState.PRUNED:  # the signal is kept aside: samplers expect no intermediate values
                assert t.values is None and t.intermediate_values == {} and max(pruning.signal_values(t)) == 1


def test_a_multi_objective_tpe_search_goes_on_after_pruned_trials(tmp_path):
    """TPE (the default sampler) ranks pruned trials by their intermediate values with study.direction,
    which a multi-objective study refuses: the signal kept aside lets it sample on past its startup."""
    journal = tmp_path / "s.journal"
    run(tmp_path, "curve", "-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=5", "hydra.sweeper.n_trials=12",
        "hydra.sweeper.direction=[minimize,minimize]", "x=interval(-5,5)", "objectives=2", *MEDIAN,
        f"hydra.sweeper.storage={journal}", "hydra.sweeper.study_name=tpe2")
    states = [t.state for t in _study(tmp_path, str(journal), "tpe2").trials]
    assert len(states) == 12 and TrialState.PRUNED in states and TrialState.FAIL not in states


def test_a_signal_that_runs_against_its_objective_is_stored_negated(tmp_path):
    """The curve's loss reported for an objective declared as maximised (signal_direction=minimize):
    stored as -loss, so the pruner and the samplers read it the objective's way."""
    journal = tmp_path / "s.journal"
    run(tmp_path, "curve", "-m", "x=0,1,4", *MEDIAN, "hydra.sweeper.direction=maximize",
        "hydra.sweeper.signal_direction=minimize", f"hydra.sweeper.storage={journal}",
        "hydra.sweeper.study_name=negated")
    trials = sorted(_study(tmp_path, str(journal), "negated").trials, key=lambda t: t.number)
    assert trials[0].intermediate_values[0] == pytest.approx(-loss(0, 0))
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]


# Each pruner's settings for a 4-trial grid (x=0, 1, 4, 0.5), and the trials it must prune: x=4's curve
# is the worst at every step. patient: the curves never stop improving, so its patience never runs out.
# wilcoxon compares each trial with the best one, step by step: a signed-rank test needs 4 steps here.
PRUNER_CASES = {
    "none": ([], []),
    "median": (["hydra.sweeper.pruner.n_startup_trials=2"], [2]),
    "percentile": (["hydra.sweeper.pruner.percentile=50", "hydra.sweeper.pruner.n_startup_trials=2"], [2]),
    "successive_halving": (["hydra.sweeper.pruner.min_resource=1", "hydra.sweeper.pruner.reduction_factor=2"],
                           None),
    "hyperband": (["hydra.sweeper.pruner.max_resource=6", "hydra.sweeper.pruner.reduction_factor=2"], None),
    "wilcoxon": ([], [1, 2, 3]),  # every curve is above the best one (x=0) at each step: all go, at step 3
    "threshold": (["hydra.sweeper.pruner.upper=20"], [2]),
    "patient": (["hydra.sweeper.pruner.patience=0", "hydra.sweeper.pruner.wrapped_pruner.n_startup_trials=2"], []),
}


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_config_builds_its_optuna_pruner_and_runs_a_grid(tmp_path, name):
    """Each hydra/sweeper/pruner/*.yaml, as shipped, with the settings of PRUNER_CASES."""
    extra, expected = PRUNER_CASES[name]
    run(tmp_path, "curve", "-m", "x=0,1,4,0.5", f"hydra/sweeper/pruner={name}", *extra)
    out = results(tmp_path)
    assert sum(out["trials"].values()) == 4 and out["best_params"] == {"x": 0}
    pruned = [p["trial"] for p in out.get("pruned", [])]
    if expected is None:  # halving keeps the best share at each rung: x=4 never goes on
        assert 2 in pruned and 0 not in pruned
    else:
        assert pruned == expected


def test_bad_pruning_settings_are_refused_before_any_job(tmp_path):
    for args, message in [
        (["hydra/sweeper/pruner=threshold"], "hydra.sweeper.pruner: cannot create optuna.pruners.ThresholdPruner"),
        (["hydra.sweeper.prune_on=cost"], "hydra.sweeper.prune_on: 'cost' is not an objective"),
        (["hydra.sweeper.signal_direction=down"], "hydra.sweeper.signal_direction: 'down'"),
    ]:
        proc = run(tmp_path, "curve", "-m", "x=0,1", *args, ok=False)
        assert proc.returncode == 1 and message in proc.stdout, proc.stdout[-2000:]
        assert "Launching" not in proc.stdout


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_two_workers_prune_in_one_study(tmp_path, storage, request):
    """Two processes share one study and its pruner: n_trials in total, each trial told once, and the
    trials each pruned had at least the startup trials' curves to compare with."""
    url = str(tmp_path / "s.journal") if storage == "journal" else request.getfixturevalue("pg").url
    name = f"two-{storage}-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARETUNE_")}
    cmd = [sys.executable, str(TASK), "curve", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random",
           "hydra.sweeper.n_trials=16", "x=interval(-5,5)", *MEDIAN, f"hydra.sweeper.storage={url}",
           f"hydra.sweeper.study_name={name}"]
    procs = [subprocess.Popen([*cmd, f"hydra.sweeper.sampler.seed={i}", f"hydra.sweep.dir={tmp_path / f'w{i}'}"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    trials = _study(tmp_path, url, name).trials
    states = [t.state for t in trials]
    assert len(trials) == 16 and TrialState.RUNNING not in states and TrialState.FAIL not in states
    assert states.count(TrialState.PRUNED) >= 3
    first_complete = min(t.number for t in trials if t.state == TrialState.COMPLETE)
    for t in trials:
        if t.state == TrialState.PRUNED:
            # never before step 1 (n_warmup_steps); later when the other worker's curves changed the median
            assert t.number > first_complete and t.last_step >= 1
    for i in range(2):
        done = yaml.safe_load(next((tmp_path / f"w{i}").glob("optimization_results.yaml")).read_text())
        assert sum(done["trials"].values()) == 16


def _search(tmp_path: Path, name: str, seed: int, n_trials: int, folder: str, *extra: str) -> dict:
    """A random search of the curve app in a journal study; its optimization_results.yaml."""
    run(tmp_path, "curve", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random", "x=interval(-5,5)",
        *MEDIAN, f"hydra.sweeper.storage={tmp_path / 's.journal'}", f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.sampler.seed={seed}", f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweep.dir={tmp_path / folder}", *extra)
    return yaml.safe_load((tmp_path / folder / "optimization_results.yaml").read_text())


def test_a_resumed_search_prunes_against_the_curves_of_the_earlier_run(tmp_path):
    """Started again with more trials, the study keeps its pruned trials (they count, and are not run
    again), and the new run's very first trial is judged against the earlier run's curves."""
    _search(tmp_path, "resumed", 1, 6, "first")
    study = _study(tmp_path, str(tmp_path / "s.journal"), "resumed")
    before = {t.number: (t.state, t.params) for t in study.trials}
    assert len(before) == 6 and TrialState.RUNNING not in {s for s, _ in before.values()}
    study.enqueue_trial({"x": 4.5})  # the next run's first trial: worse than any curve at |x| < 4.5
    out = _search(tmp_path, "resumed", 2, 9, "second")
    trials = sorted(_study(tmp_path, str(tmp_path / "s.journal"), "resumed").trials, key=lambda t: t.number)
    assert len(trials) == 9 and {t.number: (t.state, t.params) for t in trials[:6]} == before
    assert trials[6].params == {"x": 4.5} and trials[6].state == TrialState.PRUNED
    assert trials[6].intermediate_values == pytest.approx({0: loss(4.5, 0), 1: loss(4.5, 1)})
    assert sum(out["trials"].values()) == 9 and {"trial": 6, "step": 1} in out["pruned"]


def test_a_stale_trial_that_had_reported_is_retried_and_judged_on_its_own_reports(tmp_path):
    """A trial lost mid-run (its sweep process gone) after reporting three steps: retry_stale fails it
    and runs its parameters again as a new trial, which reports from step 0 and is pruned on its own
    curve; the lost trial keeps what it reported, and is replaced in the count of n_trials."""
    _search(tmp_path, "stale", 1, 4, "first")
    study = _study(tmp_path, str(tmp_path / "s.journal"), "stale")
    study.enqueue_trial({"x": 4.5})
    lost = study.ask({"x": optuna.distributions.FloatDistribution(-5, 5)})
    for step in range(3):
        study._storage.set_trial_intermediate_value(lost._trial_id, step, loss(4.5, step))  # noqa: SLF001
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = S.owner_id().rpartition(":")[0]
    study._storage.set_trial_user_attr(lost._trial_id, S.OWNER, f"{host}:{gone.stdout.strip()}")  # noqa: SLF001
    study._storage.set_trial_user_attr(lost._trial_id, S.LEASE_UNTIL, time.time() + 3600)  # noqa: SLF001

    out = _search(tmp_path, "stale", 2, 6, "second", "hydra.sweeper.retry_stale=true")
    trials = sorted(_study(tmp_path, str(tmp_path / "s.journal"), "stale").trials, key=lambda t: t.number)
    was = trials[lost.number]
    assert was.state == TrialState.FAIL and was.user_attrs[S.STALE] and len(was.intermediate_values) == 3
    [retry] = [t for t in trials if t.user_attrs.get(S.RETRY_OF) == lost.number]
    assert retry.params == {"x": 4.5} and retry.state == TrialState.PRUNED
    assert retry.intermediate_values == pytest.approx({0: loss(4.5, 0), 1: loss(4.5, 1)})
    assert len(trials) == 7 and S.counted(trials) == 6  # 4 + the retry + one more; the lost one is replaced
    assert {"trial": retry.number, "step": 1} in out["pruned"]


def test_the_pruners_view_has_one_direction_and_values_trials_by_their_last_signal():
    """SignalStorage on a two-objective study: the pruner sees one direction, a completed trial's
    value is its last intermediate value, and MedianPruner prunes a curve above the median."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for x in (0.0, 1.0, 2.0):
        trial = study.ask()
        for step in range(3):
            study._storage.set_trial_intermediate_value(trial._trial_id, step, loss(x, step))  # noqa: SLF001
        study.tell(trial, [1.0 / (1 + x), x])
    pruning.remember_memory(study.study_name, study._storage)  # noqa: SLF001

    def reporter_of(trial: optuna.Trial) -> pruning.Reporter:
        override = pruning.env_override(study.study_name, trial.number, "minimize", 1.0)
        report = pruning.reporter(storage=None, pruner={"_target_": "optuna.pruners.MedianPruner",
                                                        "n_startup_trials": 2},
                                  environ={pruning.ENV: override.split("=", 1)[1].strip("'")})
        assert report is not None
        return report

    good, worse = study.ask(), study.ask()
    report = reporter_of(good)
    assert report.study.directions == [StudyDirection.MINIMIZE]
    assert [t.values for t in report.study.get_trials(states=(TrialState.COMPLETE,))] == \
        [[pytest.approx(loss(x, 2))] for x in (0.0, 1.0, 2.0)]
    assert report.report(0, loss(0.5, 0)) is False  # below the median of the curves at step 0 (x=1's)
    assert reporter_of(worse).report(0, loss(3.0, 0)) is True  # above it
    assert worse.number not in pruning.pruned_steps(study.trials)  # reporting does not end the trial


def test_successive_halving_reads_only_its_rungs_and_other_pruners_any_step():
    """Rungs.of: the steps successive halving judges a trial at, from its own settings; None (report
    at every step) for an 'auto' min_resource and for every other pruner."""
    sh = optuna.pruners.SuccessiveHalvingPruner
    rungs = pruning.Rungs.of(sh(min_resource=2, reduction_factor=3))
    assert rungs is not None and [rungs.after(s) for s in (0, 1, 2, 5, 6, 17, 18)] == [2, 2, 6, 6, 18, 18, 54]
    assert pruning.Rungs.of(sh(min_resource=4, reduction_factor=2, min_early_stopping_rate=1)).after(0) == 8
    for other in (sh(), optuna.pruners.MedianPruner(), optuna.pruners.HyperbandPruner(min_resource=2),
                  optuna.pruners.PatientPruner(sh(min_resource=2), patience=1), optuna.pruners.NopPruner()):
        assert pruning.Rungs.of(other) is None, other


CURVES = (1.0, 0.5, 2.0, 0.1, 1.5, 0.3, 3.0, 0.2, float("nan"), 0.7, 0.05, 2.5)  # nan: a diverged trial


@pytest.mark.parametrize(("objectives", "every", "last", "settings"), [
    (1, 1, 20, {}),
    (2, 1, 20, {}),
    (1, 4, 20, {}),                                  # reports at 4, 8...: each judges the rung just passed
    (2, 5, 23, {}),                                  # a last step that is no cadence step and no rung
    (1, 3, 26, {"min_early_stopping_rate": 1}),      # rungs at 6 and 18
    (1, 2, 19, {"bootstrap_count": 2}),              # nobody goes on until 2 trials reached the rung
    (1, 7, 20, {}),                                  # one report past two rungs at once (2 and 6 at step 7)
])
def test_a_trial_that_reports_only_when_due_is_judged_as_one_that_reports_every_step(objectives, every, last,
                                                                                      settings):
    """The same twelve curves through successive halving twice, in two studies, as the worker reports
    (every ``every`` steps and at the last): once at each of these steps, once only where the reporter
    says a report is due. The same trials are pruned at the same steps, on the same values at each rung
    (successive halving's ``completed_rung_*`` attrs), with fewer reports."""
    pruner = {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 2, "reduction_factor": 3,
              **settings}
    first = pruning.Rungs.of(optuna.pruners.SuccessiveHalvingPruner(**{k: v for k, v in pruner.items()
                                                                        if k != "_target_"}))
    assert first is not None

    def run(sparse: bool) -> tuple[list[tuple[TrialState, int | None, dict]], int]:
        study = optuna.create_study(directions=["minimize"] * objectives)
        pruning.remember_memory(study.study_name, study._storage)  # noqa: SLF001
        outcome, reports = [], 0
        for x in CURVES:
            trial = study.ask()
            override = pruning.env_override(study.study_name, trial.number, "minimize", 1.0)
            report = pruning.reporter(storage=None, pruner=pruner,
                                      environ={pruning.ENV: override.split("=", 1)[1].strip("'")})
            assert report is not None and report.next_due() == first.after(0)
            pruned_at = None
            for step in range(1, last + 1):
                if step % every and step != last or (sparse and not report.due(step)):
                    continue
                reports += 1
                if report.report(step, loss(x, step) + 0.01 * step * x):
                    pruned_at = step
                    break
            if pruned_at is None:
                study.tell(trial, [0.0 if math.isnan(x) else x] * objectives)
            else:
                study.tell(trial, state=TrialState.PRUNED)
            done = study.trials[-1]
            outcome.append((done.state, pruned_at,
                            {k: v for k, v in done.system_attrs.items() if k.startswith("completed_rung")}))
        return outcome, reports

    (dense, n_dense), (sparse, n_sparse) = run(False), run(True)
    assert sparse == dense
    stops = {step for _, step, _ in dense}
    assert stops - {None}, stops  # the comparison is not empty: the pruner stopped some trials
    if every == 1 and not settings:
        assert stops == {None, 2, 6}  # at both rungs before the last step, and some not at all
    assert n_sparse < n_dense


@pytest.mark.slow
def test_a_trial_of_the_real_cli_is_pruned_after_its_first_report(tmp_path, data_root, cache_dir):
    """paretune's own sweep on the tiny model with a threshold pruner that stops every trial at its first
    report: the worker reports its eval loss on a few examples, the parent relays it to the study (stored
    negated: eval/rougeL, the first objective, is maximised), and the trial stops, recorded as pruned,
    without evaluation."""
    from tests.conftest import TINY

    sweep, journal = tmp_path / "sweep", tmp_path / "s.journal"
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", *TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}",
         "logger=none", f"hydra.sweep.dir={sweep}", f"hydra.sweeper.storage={journal}",
         "hydra.sweeper.study_name=pruned-cli", "hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.lower=0",
         "train.max_steps=400", "eval.signal_every=2", "eval.signal_examples=2", "lora.r=2,4"],
        cwd=tmp_path, env={**os.environ, "PARETUNE_STUDY_STORAGE": str(journal)}, capture_output=True, text=True,
        timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = _study(tmp_path, str(journal), "pruned-cli")
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    warm = {json.loads((sweep / str(t.number) / "result.json").read_text())["run"]["process"]["warm_worker_pid"]
            for t in study.trials}
    assert len(warm) == 1 and None not in warm  # pruning leaves the trials' environment, so their warm worker, alone
    for t in study.trials:
        record = json.loads((sweep / str(t.number) / "result.json").read_text())
        assert record["status"] == "pruned" and record["objectives"] == {}
        assert record["run"]["pruned"]["step"] == 2 and record["run"]["stopped_by"] == "pruned"
        assert record["run"]["pruned"]["stopped_after_step"] == 2  # the step it reported: it waits for the answer
        assert "eval/rougeL" not in record["metrics"] and record["metrics"]["cost/train_s"] > 0
        assert record["timings"]["signal_s"] > 0
        signal = [json.loads(x) for x in (sweep / str(t.number) / "signal.jsonl").read_text().splitlines()]
        assert signal[0]["step"] == 2 and pruning.signal_values(t)[2] == pytest.approx(-signal[0]["value"])
        assert t.user_attrs[S.STATUS] == "pruned"
    # the analysis lists them with the step they stopped at, from the study and from the records alike
    from analysis import trials as A

    for data in (A.from_storage("pruned-cli", str(journal)), A.from_records(sorted(sweep.glob("*/result.json")))):
        assert [(r.status, r.error) for r in data.rows] == [("pruned", "pruned by the study's pruner at step 2")] * 2


class _Reporter:
    """Stands in for the study: says stop at ``stop_at``; raises for a value below zero (an unreachable
    database)."""

    def __init__(self, stop_at: int) -> None:
        self.stop_at, self.seen = stop_at, []

    def next_due(self) -> None:
        return None  # it does not know the pruner's schedule: every cadence step is due

    def report(self, step: int, value: float) -> bool:
        if value < 0:
            raise ConnectionError("database unreachable")
        self.seen.append(step)
        return step >= self.stop_at


def test_the_relay_answers_every_report_and_the_worker_waits_for_the_answer(tmp_path):
    """The worker's wait (src/worker._await_decision) gets the parent's answer to the step it reported:
    go on, or stop there (prune.json written first, with the value); a report that cannot reach the
    study is answered 'go on'; an answer that never comes is not waited for past the bound."""
    from src import relay, worker
    from src import results as R

    reporter = _Reporter(stop_at=4)
    signal, decided, pruned = tmp_path / R.SIGNAL_FILE, tmp_path / R.DECIDED_FILE, tmp_path / R.PRUNE_FILE
    assert worker._await_decision(decided, 1, wait_s=0.05) is None  # no relay: the bound, then train on
    with relay.Relay(reporter, tmp_path) as rl:
        for step, value, prune in ((1, -1.0, False), (2, 2.5, False), (4, 2.9, True), (6, 2.0, True)):
            with open(signal, "a") as fh:
                fh.write(json.dumps({"step": step, "value": value}) + "\n")
            t0 = time.perf_counter()
            # (next: None: this reporter does not say when the next report is due, so every one is)
            assert worker._await_decision(decided, step) == {"step": step, "prune": prune, "next": None}
            assert time.perf_counter() - t0 < 5
            assert pruned.exists() == prune  # written before the answer: the worker records its value
        assert rl.pruned_at == 4
    assert reporter.seen == [2, 4]  # after the pruner's 'stop', a later report is answered without asking it
    assert json.loads(pruned.read_text()) == {"step": 4, "value": 2.9}
    # a 'stop' whose answer came after the worker's wait ran out is an answer to its next report
    assert worker._await_decision(tmp_path / "none.json", 8, wait_s=5, pruned=pruned) == {"step": 8, "prune": True}


def test_under_successive_halving_the_worker_reports_only_at_the_rungs(tmp_path, monkeypatch):
    """The channel whole (worker._signal, the relay, a Reporter on an in-memory study): with rungs at
    steps 2 and 6, a 10-step trial reporting every 2 steps reports at 2 and 6 only, the relay's answers
    saying when the next report is due; the last step (10) is not a rung, so it is not reported either."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from src import evaluate, relay, worker
    from src import results as R

    study = optuna.create_study(directions=["maximize", "minimize"])
    pruning.remember_memory(study.study_name, study._storage)  # noqa: SLF001
    override = pruning.env_override(study.study_name, study.ask().number, "minimize", 1.0)
    reporter = pruning.reporter(storage=None, pruner={
        "_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 2, "reduction_factor": 3},
        environ={pruning.ENV: override.split("=", 1)[1].strip("'")})
    monkeypatch.setattr(evaluate, "eval_loss", lambda net, ex, bs, pad: 2.0)
    inputs = SimpleNamespace(train_examples=[], pad_id=0, eval_examples=[SimpleNamespace(input_ids=[1])])
    cfg = OmegaConf.create({"trial": {"reports_signal": True}, "eval": {"signal_every": 2, "signal_examples": 1},
                            "train": {"max_steps": 10, "epochs": None, "batch_size": 1}})
    with relay.Relay(reporter, tmp_path):
        assert json.loads((tmp_path / R.DECIDED_FILE).read_text()) == {"step": 0, "prune": False, "next": 2}
        on_step = worker._signal(worker.Trial(cfg=cfg, trial_dir=tmp_path), SimpleNamespace(
            eval=lambda: None, train=lambda: None), inputs)
        assert [step for step in range(1, 11) if on_step(step)] == []  # the first trial passes its rungs
    assert [json.loads(x)["step"] for x in (tmp_path / R.SIGNAL_FILE).read_text().splitlines()] == [2, 6]
    assert json.loads((tmp_path / R.DECIDED_FILE).read_text()) == {"step": 6, "prune": False, "next": 18}
    assert pruning.signal_values(study._storage.get_trial(0)) == {2: 2.0, 6: 2.0}  # noqa: SLF001
    study.tell(0, [0.5, 1.0])
    # a second trial, worse at the first rung: stopped there, training ends at the step it reported
    override = pruning.env_override(study.study_name, study.ask().number, "minimize", 1.0)
    reporter = pruning.reporter(storage=None, pruner={
        "_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 2, "reduction_factor": 3},
        environ={pruning.ENV: override.split("=", 1)[1].strip("'")})
    monkeypatch.setattr(evaluate, "eval_loss", lambda net, ex, bs, pad: 3.0)
    (tmp_path / "1").mkdir()
    t = worker.Trial(cfg=cfg, trial_dir=tmp_path / "1")
    with relay.Relay(reporter, tmp_path / "1") as rl:
        on_step = worker._signal(t, SimpleNamespace(eval=lambda: None, train=lambda: None), inputs)
        assert next(step for step in range(1, 11) if on_step(step)) == 2  # training ends there
    assert rl.pruned_at == 2 and t.run["pruned"] == {"step": 2, "value": 3.0, "stopped_after_step": 2}
    assert pruning.signal_values(study._storage.get_trial(1)) == {2: 3.0}  # noqa: SLF001


def test_an_answer_that_comes_late_still_says_when_the_next_report_is_due(tmp_path, monkeypatch):
    """worker._signal: the answer to the report at step 2 comes after the wait ran out; the worker reads
    it before its next cadence step, so it skips step 4 as the pruner's next rung is 6, as if it had come
    in time, and waits for the next answers again. A late answer that says nothing of the next rung
    (None) leaves every cadence step due; a late answer that says prune stops the trial at once."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from src import evaluate, worker
    from src import results as R

    monkeypatch.setattr(evaluate, "eval_loss", lambda net, ex, bs, pad: 1.0)
    inputs = SimpleNamespace(train_examples=[], pad_id=0, eval_examples=[SimpleNamespace(input_ids=[1])])
    cfg = OmegaConf.create({"trial": {"reports_signal": True}, "eval": {"signal_every": 2, "signal_examples": 1},
                            "train": {"max_steps": 12, "epochs": None, "batch_size": 1}})

    def reported(folder: str, late_next: int | None, late_prune: bool = False,
                 ) -> tuple[list[int], dict[int, float], int | None]:
        """The steps reported, the wait given to each report's answer, and the step training stopped at."""
        d = tmp_path / folder
        d.mkdir()
        R.atomic_write_json(d / R.DECIDED_FILE, {"step": 0, "prune": False, "next": 2})
        waits: dict[int, float] = {}

        def answer(decided: Path, step: int, wait_s: float = 0, pruned: Path | None = None) -> dict | None:
            waits[step] = wait_s
            if step == 2:  # the answer is written just after the worker stopped waiting for it
                R.atomic_write_json(decided, {"step": 2, "prune": late_prune, "next": late_next})
                return None
            return {"step": step, "prune": False, "next": 18}

        monkeypatch.setattr(worker, "_await_decision", answer)
        t = worker.Trial(cfg=cfg, trial_dir=d)
        on_step = worker._signal(t, SimpleNamespace(eval=lambda: None, train=lambda: None), inputs)
        stopped = next((step for step in range(1, 13) if on_step(step)), None)
        assert stopped is None or t.run["pruned"]["stopped_after_step"] == stopped
        return [json.loads(x)["step"] for x in (d / R.SIGNAL_FILE).read_text().splitlines()], waits, stopped

    wait = worker.DECISION_WAIT_S
    assert reported("late", 6) == ([2, 6], {2: wait, 6: wait}, None)
    # then the answer to 4 says 18; the report at 4 is waited for as the late answer came before it
    assert reported("unjudged", None) == ([2, 4], {2: wait, 4: wait}, None)
    assert reported("pruned", 6, late_prune=True) == ([2], {2: wait}, 3)


def test_the_worker_reports_at_its_cadence_and_last_step_on_the_shortest_examples(tmp_path, monkeypatch):
    """worker._signal: a report every eval.signal_every steps and at the last one, each on the same
    eval.signal_examples shortest eval examples; the answer 'prune' ends training at the reported step,
    recorded with the pruner's value."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from src import evaluate, worker
    from src import results as R

    lengths = [9, 3, 7, 2, 5]
    inputs = SimpleNamespace(train_examples=[], pad_id=0,
                             eval_examples=[SimpleNamespace(input_ids=[1] * n) for n in lengths])
    judged: list[list[int]] = []
    monkeypatch.setattr(evaluate, "eval_loss", lambda net, ex, bs, pad: judged.append(
        [len(e.input_ids) for e in ex]) or 1.0)
    net = SimpleNamespace(eval=lambda: None, train=lambda: None)

    def trial(max_steps: int, answers: dict[int, bool | None], folder: str,
              ) -> tuple[worker.Trial, list[int], list[float]]:
        """Steps 1..max_steps through the hook; ``answers``: the parent's answer per reported step (None:
        none in time)."""
        d = tmp_path / folder
        d.mkdir()
        waits: list[float] = []

        def answer(decided: Path, step: int, wait_s: float = 0, pruned: Path | None = None) -> dict | None:
            waits.append(wait_s)
            if answers[step]:
                R.atomic_write_json(d / R.PRUNE_FILE, {"step": step, "value": 1.0})
            return None if answers[step] is None else {"step": step, "prune": answers[step]}

        monkeypatch.setattr(worker, "_await_decision", answer)
        cfg = OmegaConf.create({"trial": {"reports_signal": True}, "eval": {"signal_every": 4, "signal_examples": 2},
                                "train": {"max_steps": max_steps, "epochs": None, "batch_size": 2}})
        t = worker.Trial(cfg=cfg, trial_dir=d)
        on_step = worker._signal(t, net, inputs)
        stopped = next(([step] for step in range(1, max_steps + 1) if on_step(step)), [])  # training ends there
        reported = [json.loads(x)["step"] for x in (d / R.SIGNAL_FILE).read_text().splitlines()]
        return t, [*stopped, -1, *reported], waits

    t, steps, waits = trial(10, {4: False, 8: False, 10: True}, "last")
    assert steps == [10, -1, 4, 8, 10]  # the last step reports too, and stops there
    assert judged == [[2, 3]] * 3  # the two shortest eval examples, every time
    assert t.run["pruned"] == {"step": 10, "value": 1.0, "stopped_after_step": 10}
    assert t.artifacts["signal"] == R.SIGNAL_FILE and waits == [worker.DECISION_WAIT_S] * 3
    _, steps, _ = trial(8, {4: False, 8: False}, "multiple")
    assert steps == [-1, 4, 8]  # a last step on the cadence reports once; not pruned: trains to the end
    # an unanswered report: the next one is not waited for; a 'stop' that came late stops the next step
    t, steps, waits = trial(12, {4: None, 8: True, 12: False}, "late")
    assert steps == [8, -1, 4, 8] and waits == [worker.DECISION_WAIT_S, 0.0]
    (tmp_path / "late2").mkdir()
    late = worker.Trial(cfg=t.cfg, trial_dir=tmp_path / "late2")
    on_step = worker._signal(late, net, inputs)
    R.atomic_write_json(tmp_path / "late2" / R.PRUNE_FILE, {"step": 4, "value": 3.0})
    assert on_step(5) is True and late.run["pruned"] == {"step": 4, "value": 3.0, "stopped_after_step": 5}
