"""The trial configuration a benchmark measures: composed, checked and made plain as ``src.train`` does,
so a bad override is named before any measurement starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from src.config import compose  # noqa: F401  (the benchmarks' entry: bench.trial_config.compose)


class Loaded(NamedTuple):
    tok: Any
    net: Any
    facts: dict[str, Any]
    builder: Any
    train: list[Any]
    eval: list[Any]


def load(cfg: Any, eval_examples: int = 1) -> Loaded:
    """The trial's model, tokenizer and splits, loaded as the worker loads them (src.worker._load)."""
    from src import data, model

    tok, net, facts = model.load(cfg.model, Path(cfg.paths.cache_dir), cfg.train.seed)
    builder = data.PromptBuilder(tok, cfg.data.instruction, cfg.train.max_seq_len, str(cfg.data.truncation))
    train, ev, _ = data.load_splits(cfg.data, builder, eval_examples, cfg.train.seed)
    return Loaded(tok, net, facts, builder, train, ev)
