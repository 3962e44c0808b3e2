"""What a benchmark measures: the trial's model, tokenizer and splits, loaded as the worker loads them
(the configuration itself comes from src.config.compose)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple


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
