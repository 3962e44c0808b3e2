"""One reader of command-line overrides, with Hydra's grammar: what the sweeper, the trial record and the
reports take a key and value to be."""

from __future__ import annotations

from src import overrides


def test_values_are_typed_and_prefixes_dropped():
    assert overrides.values(["lora.r=8", "+train.seed=3", "train.lr=1e-4", "lora.alpha=null", "x=1,2"]) == \
        {"lora.r": 8, "train.seed": 3, "train.lr": 1e-4, "lora.alpha": None}  # the sweep x=1,2 is not a value


def test_texts_keep_what_was_typed_quotes_included():
    given = ["lora.r=8", "+quant=bnb_nf4", "data.instruction='a=b, c'", "study.name=s", "hydra.run.dir=x"]
    assert overrides.texts(given, skip=("study.", "hydra.")) == \
        {"lora.r": "8", "quant": "bnb_nf4", "data.instruction": "'a=b, c'"}


def test_a_hand_written_override_hydra_cannot_parse_is_split_at_its_first_equals():
    assert overrides.texts(["weird key=(x"]) == {"weird key": "(x"}


def test_a_searched_key_typed_with_a_prefix_is_recorded_with_its_value():
    """`+confirm=trial_0,trial_6` (analysis confirm) is searched as `+confirm`; the record keeps its value."""
    from omegaconf import OmegaConf

    from src.train import _study_info

    cfg = OmegaConf.create({"study": {"name": "s-confirm", "trial": 4, "params": ["+confirm", "train.seed"]}})
    info = _study_info(cfg, ["+confirm=trial_6", "train.seed=2", "study.name=s-confirm", "study.trial=4"])
    assert info == {"name": "s-confirm", "trial": 4, "params": {"+confirm": "trial_6", "train.seed": 2}}
    assert overrides.bare("++a.b") == "a.b" and overrides.bare("~x") == "x" and overrides.bare("y") == "y"


def test_merged_repeats_show_every_seed_and_their_shared_keys_once():
    from analysis.summary import Group
    from analysis.trials import TrialRow

    rows = [TrialRow(number=n, status="completed", params={"+confirm": "trial_0", "train.seed": s}, overrides=[])
            for n, s in ((1, 1), (2, 2), (3, 3))]
    group = Group(rows=rows, values=[0.1], mean={}, std={})
    assert group.params == {"+confirm": "trial_0", "train.seed": "1,2,3"}
    assert Group(rows=rows[:1], values=[0.1], mean={}, std={}).params == {"+confirm": "trial_0", "train.seed": 1}
