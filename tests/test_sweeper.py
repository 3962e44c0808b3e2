"""The sweepers' pure parts: search-space parsing, study bookkeeping, leases, results, samplers."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from src.config import PROJECT_ROOT, register_configs
from src.sweeper import report, space
from src.sweeper import study as S
from src.sweeper.base import tell
from src.sweeper.optuna_sweeper import OptunaSweeper

SAMPLER_DIR = PROJECT_ROOT / "hydra_plugins/paretune_sweepers/conf/hydra/sweeper/sampler"  # shipped with the sweepers
SAMPLERS = sorted(p.stem for p in SAMPLER_DIR.glob("*.yaml"))
# The Optuna class each sampler option must build: a config that built another one (or none, which
# is Optuna's default TPE) would silently run a different search.
SAMPLER_CLASSES = {"bruteforce": optuna.samplers.BruteForceSampler, "cmaes": optuna.samplers.CmaEsSampler,
                   "gp": optuna.samplers.GPSampler, "grid": optuna.samplers.GridSampler,
                   "nsgaii": optuna.samplers.NSGAIISampler, "nsgaiii": optuna.samplers.NSGAIIISampler,
                   "qmc": optuna.samplers.QMCSampler, "random": optuna.samplers.RandomSampler,
                   "tpe": optuna.samplers.TPESampler}


def build(*overrides: str) -> space.SearchSpace:
    return space.build(OverridesParser.create().parse_overrides(list(overrides)))


def test_every_hydra_sweep_expression_maps_to_its_meaning():
    s = build("a=1,2,3", "b=choice(x,y)", "c=range(1,3)", "d=range(0.1,0.4,0.1)", "e=interval(0.1,1.0)",
              "f=int(interval(1,10))", "g=tag(log,interval(1e-4,1e-2))", "h=tag(log,int(interval(1,64)))",
              "quant=none", "+experiment=quality")
    d = s.distributions
    assert d["a"] == CategoricalDistribution([1, 2, 3]) and d["b"] == CategoricalDistribution(["x", "y"])
    assert d["c"] == IntDistribution(1, 2)  # range's end is excluded, as in Hydra's basic sweeper
    # float ranges: exactly the values Hydra's basic sweeper would run, float artefacts included
    hydra_values = list(OverridesParser.create().parse_override("d=range(0.1,0.4,0.1)").sweep_iterator())
    assert d["d"] == CategoricalDistribution(hydra_values)
    assert d["e"] == FloatDistribution(0.1, 1.0) and d["f"] == IntDistribution(1, 10)
    assert d["g"] == FloatDistribution(1e-4, 1e-2, log=True) and d["h"] == IntDistribution(1, 64, log=True)
    assert s.fixed == ["quant=none", "+experiment=quality"]


def test_later_overrides_win_and_values_round_trip_through_hydra():
    s = build("lora.r=4,8", "lora.r=16", "name=a b,c:d")
    assert "lora.r" not in s.distributions and s.fixed == ["lora.r=16"]
    params = {"name": "a b", "lr": 1e-05, "flag": True, "none": None, "r": 8}
    parsed = OverridesParser.create().parse_overrides(s.overrides(params)[1:])
    assert {o.get_key_element(): o.value() for o in parsed} == params


@pytest.mark.parametrize(("override", "fragment"), [
    ("r=range(5,1)", "range(5, 1, 1) is empty"),
    ("lr=interval(0.1,0.01)", "low > high"),
    ("lr=tag(log,interval(0,1))", "positive low bound"),
])
def test_bad_search_spaces_are_named(override, fragment):
    with pytest.raises(S.StudyError, match=r"hydra\.sweeper\.params\.\w+") as err:
        build(override)
    assert fragment in str(err.value)


def test_empty_choice_is_refused_by_hydra_itself():
    with pytest.raises(Exception, match="empty choice"):
        build("r=choice()")


def test_list_choices_are_searched_as_their_override_text():
    s = build("lora.target_modules=[q_proj],[q_proj,v_proj]")
    assert s.distributions["lora.target_modules"] == CategoricalDistribution(["[q_proj]", "[q_proj,v_proj]"])
    (override,) = s.overrides({"lora.target_modules": "[q_proj,v_proj]"})
    assert OverridesParser.create().parse_override(override).value() == ["q_proj", "v_proj"]


def test_grid_and_extremes():
    s = build("r=4,8,16", "t=range(1,3)", "lr=interval(0.1,0.2)")
    with pytest.raises(S.StudyError, match="grid needs finite values"):
        s.grid()
    g = build("r=4,8,16", "t=range(1,5,2)").grid()
    assert g == {"r": [4, 8, 16], "t": [1, 3]}
    ext = s.extremes()
    assert {e["r"] for e in ext} == {4, 8, 16} and {e["lr"] for e in ext} == {0.1, 0.2}
    assert len(ext) == 1 + 2 + 1 + 1
    corners = s.corners()
    assert len(corners) == s.corner_count() == 3 * 2 * 2  # every choice, both ends of each range
    assert {(c["r"], c["t"], c["lr"]) for c in corners} == {(r, t, lr) for r in (4, 8, 16) for t in (1, 2)
                                                            for lr in (0.1, 0.2)}


def test_a_search_too_large_for_its_corners_keeps_its_extremes_check(caplog):
    from src.sweeper.base import MAX_CORNERS

    sweeper = OptunaSweeper(params={})
    small = build("r=4,8", "lr=interval(0.1,0.2)")
    assert sweeper.corners_to_check(small) == small.corners()
    wide = build(f"a=range(0,{MAX_CORNERS})", "b=1,2,3")  # an integer range: two ends
    assert wide.corner_count() == 2 * 3
    huge = build("a=" + ",".join(str(i) for i in range(MAX_CORNERS // 2 + 1)), "b=1,2")
    assert huge.corner_count() > MAX_CORNERS
    assert sweeper.corners_to_check(huge) == [] and "its extremes were checked" in caplog.text


def test_mask_url_hides_only_the_password():
    assert S.mask_url("postgresql://u:pw@db.example:5433/x") == "postgresql://u:***@db.example:5433/x"
    assert S.mask_url("postgresql://u@host/x") == "postgresql://u@host/x"
    assert S.mask_url("/tmp/a.journal") == "/tmp/a.journal"


def test_default_study_name_is_stable_and_specific():
    a = S.default_study_name("search", ["lora.r=4,8"], ["eval/rougeL"])
    assert a == S.default_study_name("search", ["lora.r=4,8"], ["eval/rougeL"])
    assert a != S.default_study_name("search", ["lora.r=4,16"], ["eval/rougeL"])


def _journal_study(tmp_path: Path, name: str = "s") -> tuple[optuna.Study, str]:
    spec = str(tmp_path / "j.journal")
    return optuna.create_study(storage=S.open_storage(spec), study_name=name,
                               directions=["maximize", "minimize"]), spec


DIST = {"r": CategoricalDistribution([4, 8, 16])}


def test_stale_trials_are_failed_and_retried_once(tmp_path):
    study, _ = _journal_study(tmp_path)
    leases = S.Leases(study._storage, lease_s=60)
    mine = study.ask(DIST)
    leases.take(mine._trial_id)
    expired = study.ask(DIST)
    study._storage.set_trial_user_attr(expired._trial_id, S.OWNER, "elsewhere:1")
    study._storage.set_trial_user_attr(expired._trial_id, S.LEASE_UNTIL, time.time() - 1)
    dead = study.ask(DIST)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = S.owner_id().rpartition(":")[0]
    study._storage.set_trial_user_attr(dead._trial_id, S.OWNER, f"{host}:{gone.stdout.strip()}")
    study._storage.set_trial_user_attr(dead._trial_id, S.LEASE_UNTIL, time.time() + 3600)
    live = study.ask(DIST)
    study._storage.set_trial_user_attr(live._trial_id, S.OWNER, "elsewhere:2")
    study._storage.set_trial_user_attr(live._trial_id, S.LEASE_UNTIL, time.time() + 3600)

    failed = S.fail_stale(study)
    assert sorted(t.number for t in failed) == [expired.number, dead.number]
    states = {t.number: t.state for t in study.trials}
    assert states[mine.number] == states[live.number] == TrialState.RUNNING
    reasons = {t.number: t.user_attrs.get(S.ERROR, "") for t in study.trials}
    assert "lease expired" in reasons[expired.number] and "is gone" in reasons[dead.number]
    assert S.fail_stale(study) == []  # idempotent

    assert sorted(S.retry_stale(study)) == [expired.number, dead.number]
    assert S.retry_stale(study) == []  # once only
    retried = study.ask(DIST)
    assert retried.params == study.trials[expired.number].params
    assert study.trials[retried.number].user_attrs[S.RETRY_OF] == expired.number
    leases.stop()


def test_a_trial_without_a_lease_yet_is_stale_only_after_the_grace(tmp_path):
    """A trial asked by another worker whose first lease write is held up (a PostgreSQL restart drops
    the session-bound study lock meanwhile) is not failed under it; one that never took a lease in
    lease_s since this process first saw it so (its worker died while asking) is."""
    study, _ = _journal_study(tmp_path)
    asked = study.ask(DIST)
    assert S.fail_stale(study, grace_s=60) == []
    assert S.fail_stale(study, now=time.time() + 30, grace_s=60) == []
    assert study.trials[asked.number].state == TrialState.RUNNING
    failed = S.fail_stale(study, now=time.time() + 61, grace_s=60)
    assert [t.number for t in failed] == [asked.number]
    assert "took no lease in the 60 s" in study.trials[asked.number].user_attrs[S.ERROR]
    # the worker whose lease write comes after that is told so, and holds nothing
    leases = S.Leases(study._storage, lease_s=60)
    assert leases.take(asked._trial_id) is False and leases.held() == []
    fresh = study.ask(DIST)
    assert leases.take(fresh._trial_id) is True and leases.held() == [fresh._trial_id]
    leases.stop()


def test_counted_replaces_a_retried_failure_by_its_retry(tmp_path):
    study, _ = _journal_study(tmp_path)
    a = study.ask(DIST)
    study.tell(a, [1.0, 1.0])
    b = study.ask(DIST)
    S.fail_trial(study, b._trial_id, "lost", stale=True)
    assert S.counted(study.trials) == 2
    S.retry_stale(study)
    c = study.ask(DIST)
    assert S.counted(study.trials) == 2  # b is replaced by c
    study.tell(c, [2.0, 2.0])
    assert S.counted(study.trials) == 2


def test_lease_is_renewed_while_the_trial_runs(tmp_path):
    study, _ = _journal_study(tmp_path)
    leases = S.Leases(study._storage, lease_s=0.6)
    t = study.ask(DIST)
    leases.take(t._trial_id)
    first = study.trials[0].user_attrs[S.LEASE_UNTIL]
    time.sleep(0.7)
    assert study.trials[0].user_attrs[S.LEASE_UNTIL] > first
    assert S.fail_stale(study, now=time.time() + 0.1) == []
    leases.stop()


def test_results_file_holds_the_pareto_set_without_repeats(tmp_path):
    study, _ = _journal_study(tmp_path)
    for r, values in [(4, [0.3, 10.0]), (8, [0.5, 20.0]), (16, [0.2, 30.0]), (8, [0.5, 20.0])]:
        study.enqueue_trial({"r": r})
        study.tell(study.ask(DIST), values)
    t = study.ask(DIST)
    study.tell(t, state=TrialState.FAIL)
    data = report.write_results(tmp_path / report.RESULTS_FILE, study, ["q", "c"])
    got = OmegaConf.to_container(OmegaConf.load(tmp_path / report.RESULTS_FILE))
    assert got == data
    numbers = [s["trial"] for s in data["solutions"]]
    assert numbers == [0, 1]  # trial 2 is dominated, trial 3 repeats trial 1 exactly
    assert {t.number for t in study.best_trials} - set(numbers) == {3}
    assert data["trials"] == {"complete": 4, "fail": 1}
    single = optuna.create_study(storage=study._storage, study_name="one", direction="minimize")
    single.tell(single.ask(DIST), 2.0)
    single.tell(single.ask(DIST), 1.0)
    one = report.results(single, ["c"])
    assert one["best_trial"] == 1 and one["best_value"] == 1.0 and "best_params" in one


def test_exact_pareto_repeats_need_equal_params_too(tmp_path):
    study, _ = _journal_study(tmp_path)
    for r in (4, 8):
        study.enqueue_trial({"r": r})
        study.tell(study.ask(DIST), [0.5, 20.0])
    assert [t.number for t in S.unique_pareto(study)] == [0, 1]


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_config_builds_and_samples(name):
    """Each hydra/sweeper/sampler/*.yaml as the sweeper builds it, on the space it must handle."""
    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/sweeper=optuna", f"hydra/sweeper/sampler={name}"],
                      return_hydra_config=True)
    finite = name in ("grid", "bruteforce")
    s = build("r=4,8,16", "t=range(1,3)") if finite else build("r=4,8,16", "lr=tag(log,interval(1e-4,1e-2))")
    sweeper = OptunaSweeper(sampler=cfg.hydra.sweeper.sampler, n_trials=10 if finite else 4, storage="unused")
    directions = ["minimize"] if name == "cmaes" else ["maximize", "minimize"]  # CMA-ES: one objective
    sampler = sweeper.make_sampler(s, len(directions))
    assert name in SAMPLER_CLASSES, f"name the Optuna class sampler/{name}.yaml builds in SAMPLER_CLASSES"
    assert type(sampler) is SAMPLER_CLASSES[name], type(sampler)
    study = optuna.create_study(sampler=sampler, directions=directions)
    seen = []
    for i in range(sweeper._limit(s)):
        t = study.ask(s.distributions)
        seen.append(tuple(sorted(t.params.items())))
        tell(study, t, [float(i)] * len(directions))
    assert len(seen) == (6 if finite else 4)
    if finite:
        assert len(set(seen)) == 6  # every grid point once
    assert all(dict(p)["r"] in (4, 8, 16) for p in seen)
    if not finite:
        assert all(1e-4 <= dict(p)["lr"] <= 1e-2 and math.isfinite(dict(p)["lr"]) for p in seen)


def test_an_empty_search_is_refused():
    with pytest.raises(S.StudyError, match="nothing to search"):
        OptunaSweeper(sampler=None, n_trials=3, storage="x").make_sampler(build("a=1"))


def test_the_trial_config_never_carries_a_storage_password(cfg_factory):
    from src.config import to_plain

    cfg = cfg_factory("paths.study_storage=postgresql://u:s3cret@db:5432/optuna")
    plain = to_plain(cfg)
    assert plain["paths"]["study_storage"] == "postgresql://u:***@db:5432/optuna"
    assert "s3cret" not in str(plain)


def test_a_trial_lost_before_its_parameters_is_not_retried_and_not_counted(tmp_path):
    study, _ = _journal_study(tmp_path)
    empty = study.ask()  # killed between ask and its parameters
    S.fail_trial(study, empty._trial_id, "lost", stale=True)
    assert S.retry_stale(study) == [] and S.counted(study.trials) == 0


def test_every_private_storage_call_made_from_outside_rdbstorage_is_retried():
    """Optuna's cache and heartbeat call some private RDBStorage methods directly; a database outage
    during one of them (a parameter written by study.ask) must be retried like the public calls.
    Read from Optuna's own source, so an Optuna upgrade that calls a new one fails here."""
    import re

    from src.sweeper import retry

    root = Path(optuna.storages.__file__).parent
    called = set()
    for path in [root / "_cached_storage.py", root / "_heartbeat.py"]:
        called |= set(re.findall(r"(?:_backend|storage)\.(_[a-z][a-z_]*)\(", path.read_text()))
    called &= set(vars(optuna.storages.RDBStorage))
    assert called and called <= set(retry.CALLED_FROM_OUTSIDE), called - set(retry.CALLED_FROM_OUTSIDE)
    for name in retry.CALLED_FROM_OUTSIDE:
        wrapped = getattr(retry.RetryingRDBStorage, name)
        assert wrapped is not getattr(optuna.storages.RDBStorage, name)
        assert wrapped.__wrapped__ is getattr(optuna.storages.RDBStorage, name)
