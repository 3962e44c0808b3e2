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
