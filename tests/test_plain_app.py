"""Our sweepers in a Hydra app that knows nothing of paretune (tests/plain_app), with the keys of
Hydra's official Optuna sweeper: single-objective TPE, a grid, a multi-objective random search,
custom_search_space, failures and the failure-rate rule, repeats, on in-memory, journal and
PostgreSQL storage."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import optuna
import pytest
import yaml

from src.paths import PROJECT_ROOT
from src.sweeper import study as S

TASK = PROJECT_ROOT / "tests" / "plain_app" / "task.py"


def run(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """``python task.py -m ARGS`` from ``cwd``, as the app's user runs it (the sweepers are found as an
    installed Hydra plugin, not through a search path to paretune's conf/)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARETUNE_")}
    # one stream: Hydra logs the sweep to stdout, errors go to stderr
    proc = subprocess.run([sys.executable, str(TASK), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:]
    return proc


def results(cwd: Path) -> dict:
    [path] = list((cwd / "multirun").glob("*/*/optimization_results.yaml"))
    return yaml.safe_load(path.read_text())


def sphere(x: float, y: float, seed: int = 0) -> float:
    return x ** 2 + y ** 2 + 0.001 * seed


X_VALUES = [-5.5 + 0.5 * i for i in range(22)]  # range(-5.5, 5.5, step=0.5): Hydra's meaning, 5.5 excluded
STORAGES = ["memory", "journal", "postgresql"]


def storage_args(kind: str, tmp_path: Path, request: pytest.FixtureRequest, name: str) -> list[str]:
    """The overrides that put the study in memory (the app's own storage: null), a journal file, or
    the session's PostgreSQL server (under a name no other test uses)."""
    if kind == "memory":
        return []
    url = str(tmp_path / "s.journal") if kind == "journal" else request.getfixturevalue("pg").url
    return [f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={name}-{kind}-{os.getpid()}"]


@pytest.mark.parametrize("storage", STORAGES)
def test_the_official_example_runs_single_objective_tpe(tmp_path, storage, request):
    proc = run(tmp_path, "-m", *storage_args(storage, tmp_path, request, "sphere"))
    out = results(tmp_path)
    assert out["name"] == "optuna" and out["trials"] == {"complete": 20}
    best = out["best_params"]
    assert best["x"] in X_VALUES and best["y"] in (-5, 0, 5)
    assert out["best_value"] == pytest.approx(sphere(best["x"], best["y"]))
    # TPE (seed 123) beats what its own first random trials found, and the return value is what was told
    assert out["best_value"] <= 2.0
    if storage == "memory":
        assert out["study_name"] == "sphere" and "in memory (storage: null" in proc.stdout
        assert not list(tmp_path.rglob("*.journal")) and not list(tmp_path.rglob("*.db"))  # nothing persisted
    # every job that ran is a folder; reused repeats ran nothing
    ran = [p for p in (tmp_path / "multirun").glob("*/*/*") if p.is_dir()]
    reused = proc.stdout.count("its values are reused")
    assert len(ran) + reused == 20 and len(ran) >= 10


@pytest.mark.parametrize("storage", STORAGES)
def test_a_grid_runs_every_cell_once_and_reports_the_best(tmp_path, storage, request):
    run(tmp_path, "--config-name", "sphere_grid", "-m", "x=1,2,-3", "y=0,3",
        *storage_args(storage, tmp_path, request, "grid"))
    out = results(tmp_path)
    assert out["trials"] == {"complete": 6}
    assert out["best_params"] == {"x": 1, "y": 0} and out["best_value"] == 1.0


@pytest.mark.parametrize("storage", STORAGES)
def test_multi_objective_random_search_gives_unique_non_dominated_solutions_in_range(tmp_path, storage, request):
    run(tmp_path, "binh_korn", "-m", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=7",
        "hydra.sweeper.n_trials=24", *storage_args(storage, tmp_path, request, "binh_korn"))
    out = results(tmp_path)
    sols = out["solutions"]
    assert out["objectives"] == ["minimize", "minimize"] and out["trials"] == {"complete": 24}
    points = [(s["params"]["x"], s["params"]["y"]) for s in sols]
    assert len(set(points)) == len(points) >= 2
    xs, ys = [0.5 * i for i in range(10)], [0.5 * i for i in range(6)]
    for s in sols:
        x, y = s["params"]["x"], s["params"]["y"]
        assert x in xs and y in ys
        assert s["values"] == pytest.approx([4 * x * x + 4 * y * y, (x - 5) ** 2 + (y - 5) ** 2])
    for a in sols:
        for b in sols:
            worse = all(p >= q for p, q in zip(a["values"], b["values"], strict=True)) and a["values"] != b["values"]
            assert not worse, (a, b)


def test_custom_search_space_adds_parameters_that_depend_on_the_drawn_ones(tmp_path):
    journal = tmp_path / "studies.journal"
    run(tmp_path, "-m", "hydra.sweeper.custom_search_space=task.near_x", "hydra.sweeper.n_trials=6",
        f"hydra.sweeper.storage={journal}", "hydra.sweeper.sampler.seed=1")
    study = optuna.load_study(study_name="sphere", storage=S.open_storage(str(journal)))
    assert len(study.trials) == 6
    for t in study.trials:
        assert abs(t.params["z"] - t.params["x"]) <= 1
        if "repeat_of" not in t.user_attrs:  # the job got z as an override
            assert any(o.startswith("z=") for o in t.user_attrs[S.OVERRIDES])


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_an_exception_is_a_failed_trial_and_the_failure_rate_is_per_batch(tmp_path, storage, request):
    url = str(tmp_path / "studies.journal") if storage == "journal" else request.getfixturevalue("pg").url
    tag = f"{storage}-{os.getpid()}"

    def load(name: str) -> optuna.Study:
        return optuna.load_study(study_name=f"{name}-{tag}", storage=S.open_storage(url))

    common = ["-m", f"hydra.sweeper.storage={url}", "hydra.sweeper.n_trials=8", "fail_when_x_above=0"]
    # max_failure_rate 0 (the official default): the first failed batch stops the sweep, with its reason
    stopped = run(tmp_path, *common, f"hydra.sweeper.study_name=strict-{tag}", ok=False)
    assert stopped.returncode == 1
    assert "more than hydra.sweeper.max_failure_rate=0%" in stopped.stdout
    assert "RuntimeError: x=" in stopped.stdout and "is above 0" in stopped.stdout
    strict = load("strict")
    failed = [t for t in strict.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].params["x"] > 0 and len(strict.trials) < 8
    assert failed[0].user_attrs[S.ERROR].startswith("RuntimeError: x=")
    # 1.0: failures never stop it; batches of 2 jobs
    run(tmp_path, *common, f"hydra.sweeper.study_name=lenient-{tag}", "hydra.sweeper.max_failure_rate=1",
        "hydra.sweeper.n_jobs=2")
    lenient = load("lenient")
    states = [t.state for t in lenient.trials]
    assert len(states) == 8 and optuna.trial.TrialState.FAIL in states
    assert all((t.state == optuna.trial.TrialState.FAIL) == (t.params["x"] > 0) for t in lenient.trials)
    # 0.5 over batches of 2: a batch whose two jobs both fail stops it
    half = run(tmp_path, *common, "fail_when_x_above=-6", f"hydra.sweeper.study_name=half-{tag}",
               "hydra.sweeper.max_failure_rate=0.5", "hydra.sweeper.n_jobs=2", ok=False)
    assert half.returncode == 1 and "2 of the 2 trials of the last batch failed" in half.stdout
    assert len(load("half").trials) == 2


def test_a_return_value_that_is_not_a_number_fails_the_trial_with_the_reason(tmp_path):
    proc = run(tmp_path, "binh_korn", "-m", "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=2", ok=False)
    assert proc.returncode == 1
    assert "the task function returned 2 value(s) for 1 objective(s)" in proc.stdout


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_a_persistent_study_resumes_to_n_trials_in_total(tmp_path, storage, request):
    url = str(tmp_path / "s.journal") if storage == "journal" else request.getfixturevalue("pg").url
    name = f"resume-{storage}-{os.getpid()}"
    args = ["-m", f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={name}", "hydra.sweeper.sampler.seed=5"]
    run(tmp_path, *args, "hydra.sweeper.n_trials=4")
    run(tmp_path, *args, "hydra.sweeper.n_trials=9")
    study = optuna.load_study(study_name=name, storage=S.open_storage(url))
    assert len(study.trials) == 9 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for t in study.trials:
        assert t.values[0] == pytest.approx(sphere(t.params["x"], t.params["y"]))


def test_repeated_parameters_are_reused_or_run_with_a_new_seed(tmp_path):
    journal = tmp_path / "s.journal"
    # a space of 2 points and 6 trials: the sampler must propose completed parameters again
    small = ["-m", f"hydra.sweeper.storage={journal}", "hydra.sweeper.n_trials=6", "x=choice(1,2)",
             "y=0"]
    reuse = run(tmp_path, *small, "hydra.sweeper.study_name=reuse")
    study = optuna.load_study(study_name="reuse", storage=S.open_storage(str(journal)))
    copies = [t for t in study.trials if "repeat_of" in t.user_attrs]
    assert len(study.trials) == 6 and len(copies) == reuse.stdout.count("its values are reused") >= 4
    for t in copies:
        assert t.values == study.trials[t.user_attrs["repeat_of"]].values
    seeded = run(tmp_path, *small, "hydra.sweeper.study_name=seeded", "hydra.sweeper.on_repeat=new_seed",
                 "hydra.sweeper.seed_key=seed")
    study = optuna.load_study(study_name="seeded", storage=S.open_storage(str(journal)))
    assert "(on_repeat=new_seed)" in seeded.stdout
    runs = {(t.params["x"], t.user_attrs["seed"]) for t in study.trials}
    assert len(runs) == 6  # every trial ran: no parameter set twice with the same seed
    for t in study.trials:  # the seed reached the task: it is part of the returned value
        assert t.values[0] == pytest.approx(sphere(t.params["x"], 0, t.user_attrs["seed"]))


def test_bad_sweeper_keys_are_named_before_any_job(tmp_path):
    for extra, message in ((["hydra.sweeper.direction=up"], "hydra.sweeper.direction: ['up'] is not minimize"),
                           (["hydra.sweeper.on_repeat=again"], "hydra.sweeper.on_repeat: must be one of"),
                           (["hydra.sweeper.on_repeat=new_seed"], "needs hydra.sweeper.seed_key"),
                           (["hydra.sweeper.failure_scope=all"], "hydra.sweeper.failure_scope: must be one of")):
        proc = run(tmp_path, "-m", *extra, ok=False)
        assert proc.returncode == 1 and message in proc.stdout, proc.stdout[-2000:]
        assert not list(tmp_path.glob("multirun/*/*/*/.hydra"))


def test_the_readme_example_runs_as_printed(tmp_path):
    """README, "Use the sweepers in your own Hydra app": its two files and its command, verbatim."""
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text[text.index("### Use the sweepers in your own Hydra app"):]
    section = section[:section.index("\n### ", 5)]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    config = re.findall(r"```yaml\n(.*?)```", section, re.S)
    command = re.search(r"Run it with `(python [^`]+)`", section)
    assert len(code) == 1 and len(config) == 1 and command, "the README section lost its example"
    (tmp_path / "sphere.py").write_text(code[0])
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(config[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARETUNE_")}
    proc = subprocess.run(shlex.split(command.group(1).replace("python", sys.executable, 1)), cwd=tmp_path,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = results(tmp_path)
    best = out["best_params"]
    assert out["trials"] == {"complete": 20} and out["best_value"] == pytest.approx(best["x"] ** 2 + best["y"] ** 2)


def test_the_sweepers_and_their_configs_are_in_the_wheel(tmp_path):
    """Installable with the project: the plugin's classes and its config group are packaged."""
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    tree = tmp_path / "tree"
    shutil.copytree(PROJECT_ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".cache", "build", "*.egg-info", "multirun", "runs", "outputs", "studies", "reports",
        "wandb", "__pycache__", ".*_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(tree)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [wheel] = list(tmp_path.glob("paretune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    root = "hydra_plugins/paretune_sweepers/"
    for name in ("__init__.py", "conf/__init__.py", "conf/hydra/sweeper/optuna.yaml", "conf/hydra/sweeper/grid.yaml",
                 "conf/hydra/sweeper/hooks/none.yaml", "conf/hydra/sweeper/sampler/tpe.yaml",
                 "conf/hydra/sweeper/pruner/median.yaml"):
        assert root + name in names, name
    assert "src/sweeper/base.py" in names


def test_parameters_in_flight_in_the_same_batch_get_their_own_seed(tmp_path):
    """Two trials of one batch (n_jobs=2) with the same parameters: the second runs with another seed,
    as a repeat of a completed trial would, so no (parameters, seed) pair runs twice."""
    journal = tmp_path / "s.journal"
    run(tmp_path, "-m", f"hydra.sweeper.storage={journal}", "hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=2",
        "x=choice(1,2)", "y=0", "hydra.sweeper.seed_key=seed", "hydra.sweeper.study_name=pairs")
    study = optuna.load_study(study_name="pairs", storage=S.open_storage(str(journal)))
    trials = {t.number: t for t in study.trials}
    copies = [t for t in study.trials if S.REPEAT_OF in t.user_attrs
              and t.user_attrs[S.SEED] == trials[t.user_attrs[S.REPEAT_OF]].user_attrs[S.SEED]]
    ran = [t for t in study.trials if t not in copies]
    pairs = [(t.params["x"], t.user_attrs[S.SEED]) for t in ran]
    assert len(pairs) == len(set(pairs)) >= 2 and len(study.trials) == 8
    for t in ran:  # the seed each trial records is the one its job ran with
        assert t.values[0] == pytest.approx(sphere(t.params["x"], 0, t.user_attrs[S.SEED]))


def test_the_per_batch_failure_rule_is_the_official_one():
    from src.sweeper.base import _Outcome

    for rate, size, failed, stops in ((0.5, 2, 1, False), (0.5, 2, 2, True), (0.29, 100, 29, False),
                                      (0.29, 100, 30, True), (0.0, 1, 1, True), (1.0, 3, 3, False)):
        outcome = _Outcome(rate, "batch")
        outcome.failed = [(i, "boom") for i in range(failed)]
        if stops:
            with pytest.raises(S.StudyError, match=f"{failed} of the {size} trials of the last batch failed"):
                outcome.check(size, failed)
        else:
            outcome.check(size, failed)


def test_any_iterable_of_numbers_is_a_multi_objective_return_value():
    import numpy as np
    from hydra.core.utils import JobReturn, JobStatus

    from src.sweeper.jobs import from_return

    ret = JobReturn()
    ret.status, ret.return_value = JobStatus.COMPLETED, np.array([1.5, 2.0])
    assert from_return(Path("."), ret, ["a", "b"]).values == [1.5, 2.0]
    ret.return_value = "high"
    error = from_return(Path("."), ret, ["a"]).error
    assert error is not None and error.startswith("the task function returned 'high'")


def test_analysis_reads_a_reused_repeat_once(tmp_path):
    """A reused repeat points at its original's record: analysis must not count it as a second run."""
    from analysis.trials import from_storage
    from src import results

    storage = str(tmp_path / "s.journal")
    study = optuna.create_study(study_name="r", storage=S.open_storage(storage), directions=["minimize"])
    record = tmp_path / "0" / results.RESULT_FILE
    record.parent.mkdir()
    record.write_text("{}")
    dist = {"x": optuna.distributions.CategoricalDistribution([1, 2])}
    for n in range(2):
        study.enqueue_trial({"x": 1})
        t = study.ask(dist)
        t.set_user_attr(S.RESULT_PATH, str(record))
        if n:
            t.set_user_attr(S.REPEAT_OF, 0)
        study.tell(t, [1.0])
    assert [r.number for r in from_storage("r", storage).rows] == [0]
