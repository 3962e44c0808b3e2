"""Every YAML file composes and validates; bad values fail before any work, naming key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from src.config import ConfigError, validate
from src.paths import PROJECT_ROOT
from tests.conftest import CONF

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "hydra"))
# Hydra's own groups we add options to: sweepers, their samplers and hooks, shipped with the sweepers
# (PLUGIN_CONF) or set by our app (conf/hydra); run for real in test_study.py, test_sweeper.py and
# test_plain_app.py; here each is composed and its class found.
PLUGIN_CONF = PROJECT_ROOT / "hydra_plugins" / "paretune_sweepers" / "conf"
HYDRA_OPTIONS = sorted(p.relative_to(root).with_suffix("").as_posix()
                       for root in (CONF, PLUGIN_CONF) for p in (root / "hydra").rglob("*.yaml"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# Options that need a value only the user can give (marked ??? in their YAML).
REQUIRED_EXTRA = {
    ("model", "hf"): ["model.path={tmp}"],
    ("data", "jsonl"): ["data.root={data}", "data.train_file=train.jsonl", "data.eval_file=validation.jsonl"],
    # random weights: its objectives are speed and memory (what +experiment=scaling sets)
    ("model", "synthetic"): ["objectives=[{{name:train/tokens_per_s,direction:maximize}}]"],
}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(cfg_factory, tmp_path, data_root, group, option):
    extra = [x.format(tmp=tmp_path, data=data_root) for x in REQUIRED_EXTRA.get((group, option), [])]
    cfg = cfg_factory(f"{group}={option}", *extra)
    validate(cfg)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(cfg_factory, experiment):
    validate(cfg_factory(f"+experiment={experiment}"))


def test_every_yaml_file_is_covered():
    on_disk = {p.relative_to(root).as_posix() for root in (CONF, PLUGIN_CONF) for p in root.rglob("*.yaml")}
    covered = {"train.yaml"} | {f"{g}/{o}.yaml" for g in GROUPS for o in _options(g)} | {
        f"experiment/{p.stem}.yaml" for p in (CONF / "experiment").glob("*.yaml")} | {
        f"{o}.yaml" for o in HYDRA_OPTIONS}
    assert on_disk == covered


@pytest.mark.parametrize("option", HYDRA_OPTIONS)
def test_every_sweeper_and_sampler_option_composes_to_a_real_class(option):
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    group, name = option.rsplit("/", 1)
    overrides = ["hydra/sweeper=optuna"] if group.endswith("sampler") else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"{group}={name}"], return_hydra_config=True)
    node = cfg.hydra.sweeper.sampler if group.endswith("sampler") else cfg.hydra.sweeper
    assert get_class(node._target_)


def test_default_is_smollm2_on_mts_dialog(cfg_factory):
    cfg = cfg_factory(with_data=False)
    assert cfg.model.name == "smollm2_135m" and cfg.data.name == "mts_dialog"
    assert Path(cfg.data.root).name == "mts_dialog"
    assert [o.name for o in cfg.objectives] == ["eval/rougeL", "cost/train_s"]


def test_unknown_group_option_lists_the_accepted_ones(cfg_factory):
    with pytest.raises(MissingConfigException) as err:
        cfg_factory("model=gpt5")
    assert "model/gpt5" in str(err.value)
    for option in ("smollm2_135m", "tiny", "hf"):
        assert option in str(err.value)


@pytest.mark.parametrize("override,key,accepted", [
    ("train.lr=abc", "train.lr", "float"),
    ("data.truncation=cut", "data.truncation", "truncate"),
    ("train.scheduler=cyclic", "train.scheduler", "cosine"),
    ("logger.mode=loud", "logger.mode", "offline"),
    ("lora.r=sixteen", "lora.r", "int"),
])
def test_wrong_type_or_choice_names_key_and_accepted_values(cfg_factory, override, key, accepted):
    with pytest.raises(ConfigCompositionException) as err:
        cfg_factory(override)
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError)
    message = str(cause)
    assert key in message and accepted.lower() in message.lower()


@pytest.mark.parametrize("override,fragment", [
    ("lora.r=-1", "lora.r: must be >= 1"),
    ("lora.r=0", "lora.r: must be >= 1"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("train.lr=-0.1", "train.lr: must be > 0"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.max_steps=null", "set exactly one of them"),
    ("train.epochs=1", "set exactly one of them"),
    ("train.max_seq_len=8", "train.max_seq_len"),
    ("eval.num_examples=0", "eval.num_examples"),
    ("cpu.threads=0", "cpu.threads"),
    ("cost.amortization_hours=0", "cost.amortization_hours"),
    ("quant.bits=4", "quant.bits"),
    ("lora.target_modules=[]", "lora.target_modules"),
    ("data.instruction='Summarize {note}'", "data.instruction"),
    ("objectives=[{name: eval/accuracy, direction: maximize}]", "unknown metric 'eval/accuracy'"),
    ("eval.metrics=[loss]", "'eval/rougeL' is not measured"),
])
def test_out_of_range_values_are_rejected_with_the_key(cfg_factory, override, fragment):
    with pytest.raises(ConfigError) as err:
        validate(cfg_factory(override))
    assert fragment in str(err.value)


def test_the_training_peak_is_an_objective_only_where_the_kernel_can_reset_the_peak(cfg_factory, tmp_path,
                                                                                        monkeypatch):
    from src import cost

    objective = "objectives=[{name: cost/train_peak_rss_mb, direction: minimize}]"
    validate(cfg_factory(objective))  # Linux: a process may reset its own peak
    monkeypatch.setattr(cost, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    with pytest.raises(ConfigError, match="clear_refs is not writable here.*use 'cost/peak_rss_mb'"):
        validate(cfg_factory(objective))


def test_all_problems_are_reported_at_once(cfg_factory):
    with pytest.raises(ConfigError) as err:
        validate(cfg_factory("lora.r=-1", "train.lr=0", "eval.batch_size=0"))
    assert all(k in str(err.value) for k in ("lora.r", "train.lr", "eval.batch_size"))


def test_missing_data_file_names_the_config_key_and_the_environment_variable(cfg_factory, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(cfg_factory(f"data.root={tmp_path}"))
    message = str(err.value)
    assert "data.train_file" in message and "data.root" in message and "PARETUNE_DATA_DIR" in message


def test_data_root_follows_the_environment_variable(monkeypatch, tmp_path, cfg_factory):
    monkeypatch.setenv("PARETUNE_DATA_DIR", str(tmp_path))
    cfg = cfg_factory(with_data=False)
    assert cfg.data.root == f"{tmp_path}/mts_dialog"


def test_hf_model_needs_an_existing_local_directory_offline(cfg_factory):
    with pytest.raises(ConfigError, match="model.path: '/no/such/model' is not a local directory"):
        validate(cfg_factory("model=hf", "model.path=/no/such/model"))
