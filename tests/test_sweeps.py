"""Every ready study (conf/sweep) and W&B sweep file (sweeps/wandb) expands to valid trial configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from src import metrics as M
from src.config import PROJECT_ROOT
from src.sweeper.space import build, format_value
from src.train import preflight
from tests.conftest import write_jsonl

STUDIES = sorted(p.stem for p in (PROJECT_ROOT / "conf/sweep").glob("*.yaml"))
WANDB_SWEEPS = sorted((PROJECT_ROOT / "sweeps/wandb").glob("*.yaml"))


@pytest.fixture(scope="module")
def roomy_data(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """The test data with as many eval records as MTS-Dialog's validation split (100), so the ready
    studies' eval.num_examples fit (preflight refuses more examples than the eval file holds)."""
    root = tmp_path_factory.mktemp("roomy")
    (root / "train.jsonl").write_text((data_root / "train.jsonl").read_text())
    rows = [json.loads(line) for line in (data_root / "validation.jsonl").read_text().splitlines()]
    write_jsonl(root / "validation.jsonl", [{**rows[i % len(rows)], "id": f"val-{i}"} for i in range(100)])
    return root


@pytest.mark.parametrize("name", STUDIES)
def test_each_ready_study_composes_and_every_extreme_passes_preflight(name, cfg_factory, roomy_data):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        hydra_cfg = compose("train", overrides=[f"sweep={name}"], return_hydra_config=True).hydra
    sweeper = hydra_cfg.sweeper
    kind = sweeper._target_.rsplit(".", 1)[-1]
    params = dict(sweeper.params or {})
    if name == "none":
        assert kind == "GridSweeper" and not params
        return
    assert sweeper.study_name == name  # a fixed name: the same command resumes the same study
    space = build(OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]))
    assert space.distributions, "a ready study must search something"
    if kind == "GridSweeper":
        space.grid()  # a grid must be finite
    for params_set in space.extremes():
        cfg = cfg_factory(f"sweep={name}", *space.overrides(params_set), f"data.root={roomy_data}")
        preflight(cfg)


def test_the_ready_studies_and_wandb_sweep_files_exist():
    assert {"smoke", "rank_lr", "rank_quant_threads"} <= set(STUDIES)
    assert len(WANDB_SWEEPS) >= 2


def test_the_pruned_study_searches_what_rank_lr_searches_and_reports_on_its_rungs():
    """sweep=rank_lr_pruned is compared with sweep=rank_lr (python -m analysis compare): the same space,
    sampler and seed, only a pruner added; its rungs fall on the trials' report cadence, and every
    max_steps the space can choose is a rung, so a trial is judged at its last step too."""
    from hydra.utils import instantiate

    from src.sweeper import pruning

    def composed(name: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            return compose("train", overrides=[f"sweep={name}"], return_hydra_config=True)

    plain, pruned = composed("rank_lr"), composed("rank_lr_pruned")
    for key in ("params", "sampler", "direction", "_target_"):
        assert pruned.hydra.sweeper[key] == plain.hydra.sweeper[key], key
    assert plain.hydra.sweeper.pruner._target_ == "optuna.pruners.NopPruner"
    rungs = pruning.Rungs.of(instantiate(pruned.hydra.sweeper.pruner))
    assert rungs is not None
    params = pruned.hydra.sweeper.params
    space = build(OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]))
    steps = space.distributions["train.max_steps"].choices
    on = [rungs.after(0)]
    while on[-1] < max(steps):
        on.append(rungs.after(on[-1]))
    assert on == [2, 4, 8, 16]
    assert all(r % pruned.eval.signal_every == 0 for r in on)
    assert sorted(steps) == [4, 8, 16] and set(steps) <= set(on)


def _expand(sweep: dict, params: dict) -> list[str]:
    """What W&B's agent runs: ${env} dropped, ${args_no_hyphens} -> key=value for each parameter."""
    out = []
    for part in sweep["command"]:
        if part == "${env}":
            continue
        if part == "${args_no_hyphens}":
            out += [f"{k}={format_value(v)}" for k, v in params.items()]
        else:
            out.append(part)
    return out


def _one_value(spec: dict) -> object:
    if "values" in spec:
        return spec["values"][-1]
    if "value" in spec:
        return spec["value"]
    return spec["min"] if "min" in spec else pytest.fail(f"unhandled W&B parameter spec {spec}")


@pytest.mark.parametrize("path", WANDB_SWEEPS, ids=lambda p: p.stem)
def test_wandb_sweep_file_expands_into_overrides_hydra_accepts(path: Path, cfg_factory, roomy_data):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["metric"]["name"] in M.ALL
    params = {k: _one_value(v) for k, v in sweep["parameters"].items()}
    command = _expand(sweep, params)
    assert command[:3] == ["python", "-m", "src.train"]
    overrides = command[3:]
    assert [o for o in overrides if o.split("=")[0] in params] == [f"{k}={format_value(v)}" for k, v in params.items()]
    cfg = cfg_factory(*overrides, f"data.root={roomy_data}")
    preflight(cfg)
    assert cfg.logger.mode.name == "online"
    for key, value in params.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value
