"""Fast evaluation decoding: one forward pass over prompt + reference gives the eval loss and fills a
preallocated KV cache, from which the greedy summary is generated.

Why not ``model.generate`` (kept as ``eval.decoder=hf``, the reference path): profiled on 2 cores with
SmolLM2-135M and batches of 10, a decode step took ~200 ms where its arithmetic needs a few. The time
went to small GEMMs at 10 rows (weights re-read for few rows), to ``torch.cat`` growing the dynamic
cache every step (15% of the step, and growing with the batch), and to padding: prompts of 83 to 207
tokens batched in file order. A second, separate forward pass over prompt + reference computed the
eval loss. Here:
- prompts are batched by length (little padding), in larger batches (the weights are read once per
  step for more rows);
- the cache is transformers' ``StaticCache``: written in place, no per-step copy;
- finished rows leave the batch (greedy rows that hit the end token no longer cost a forward pass),
  a quarter of the batch at a time: dropping a row copies the whole cache, and a copy per finished
  row cost more than the finished rows' share of each step;
- each step attends only over the positions written so far (``_FilledLayer``), not over the whole
  preallocated cache: a decode step at batch 50 reads every cached key and value, which is as much
  memory traffic as the weights;
- the prompt's forward pass and its cache are shared: the eval loss runs only the reference tokens on
  a copy of the prompt's cache (rows grouped by reference length, so little padding), and generation
  continues from the prompt's last state. The loss no longer pays a second pass over the prompt;
- the vocabulary head runs only where a logit is used (reference positions, each row's last token).
Models this cannot drive (no separable decoder/head, or a cache layer that is not plain full
attention, such as sliding-window layers), and evaluation under bf16 autocast, take the reference
path, so any causal LM in any precision still evaluates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from src.data import Example
from src.loop import body_and_head


@dataclass
class Decoded:
    """Per example, in the order given: generated token ids (without the end token), the summed
    reference cross-entropy and its token count (None when the loss was not asked for)."""
    tokens: list[list[int]]
    loss_sums: list[float] | None
    loss_counts: list[int] | None
    gen_seconds: float        # decoding after the shared pass, plus the share of that pass spent on prompts
    loss_seconds: float       # the shared pass's share spent on reference tokens
    prompt_seconds: float = 0.0  # the prompt pass alone (inside gen_seconds when there is generation)


def supported(model: Any) -> bool:
    """Whether this path can drive ``model``: a decoder body and a vocabulary head, and only plain
    full-attention cache layers (a fork of a sliding-window layer would lose states), outside CPU
    autocast. Older
    transformers (the ipex-llm environment's 4.x) have no per-layer static cache: reference path."""
    if body_and_head(model) is None:
        return False
    # Under CPU autocast (cpu.dtype=bf16) rotary embeddings leave keys in fp32 and values in bf16;
    # StaticCache allocates both in the keys' dtype and then refuses the values.
    if torch.is_autocast_enabled("cpu"):
        return False
    try:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        cache = StaticCache(config=_base(model).config, max_cache_len=8)
        return all(type(layer) is StaticLayer for layer in cache.layers)
    except Exception:  # noqa: BLE001 - anything this version or config cannot do: use the reference path
        return False


def _filled_cache(config: Any, max_cache_len: int) -> Any:
    """A cache like transformers' ``StaticCache`` (preallocated, written in place) whose layers hand
    attention only the positions written so far."""
    from transformers import Cache, StaticCache
    from transformers.cache_utils import StaticLayer

    class _FilledLayer(StaticLayer):
        # StaticLayer returns (and masks) all max_cache_len positions, written or not.
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            end = int(self.cumulative_length)
            return keys[:, :, :end], values[:, :, :end]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return (int(self.cumulative_length) if self.is_initialized else 0) + query_length, 0

    n = len(StaticCache(config=config, max_cache_len=1).layers)  # allocates nothing until first written
    return Cache(layers=[_FilledLayer(max_cache_len=max_cache_len) for _ in range(n)])


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _fork(cache: Any, rows: torch.Tensor, width: int, config: Any, room: int) -> Any:
    """A new cache holding the first ``width`` positions of ``rows`` of ``cache``, with ``room`` more
    positions free: the reference tokens go there, and ``cache`` stays as the prompt left it for
    generation. Filled through each layer's own ``update``, as the model fills a cache."""
    from transformers import StaticCache

    fork = StaticCache(config=config, max_cache_len=width + room)
    layers: list[tuple[Any, Any]] = list(zip(cache.layers, fork.layers, strict=True))  # Any: static layers only
    for src, dst in layers:
        dst.update(src.keys[rows, :, :width], src.values[rows, :, :width])
    return fork


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


# Rows per forward pass over reference tokens: grouped by reference length within a prompt batch, so
# little padding is computed (references run from 3 to 300 tokens in MTS-Dialog's validation split).
LOSS_GROUP = 4
# Rows per prompt forward pass (similar lengths; the pass is compute-bound, so few rows lose nothing).
PREFILL_GROUP = 4


@torch.no_grad()
def run(model: Any, examples: list[Example], max_new_tokens: int, batch_size: int, pad_id: int,
        eos_id: int, with_loss: bool, with_generation: bool) -> Decoded:
    parts = body_and_head(model)
    if parts is None:
        raise ValueError("the fast decoder needs a model with a separate body and head; check supported() first")
    body, head = parts
    config = _base(model).config
    was_caching = config.use_cache
    config.use_cache = True
    n = len(examples)
    tokens: list[list[int]] = [[] for _ in range(n)]
    sums: list[float] = [0.0] * n
    counts: list[int] = [0] * n
    spent = {"prompt": 0.0, "loss": 0.0, "gen": 0.0}
    # Longest prompts first: similar widths share a batch, and memory peaks early and predictably.
    order = sorted(range(n), key=lambda i: -len(examples[i].prompt_ids))
    try:
        for idx in _batches(order, batch_size):
            batch = [examples[i] for i in idx]
            t0 = time.perf_counter()
            cache, last, mask = _prefill(body, config, batch, pad_id, max_new_tokens if with_generation else 0)
            width = max(len(ex.prompt_ids) for ex in batch)
            spent["prompt"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if with_loss:
                for j, (loss_sum, count) in _reference_losses(body, head, config, cache, last, mask, batch, pad_id):
                    sums[idx[j]], counts[idx[j]] = loss_sum, count
            spent["loss"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if with_generation:
                made = _greedy(body, head, cache, last, mask, width, max_new_tokens, eos_id, len(batch))
                for j, ids in enumerate(made):
                    tokens[idx[j]] = ids
            spent["gen"] += time.perf_counter() - t0
    finally:
        config.use_cache = was_caching
    # The prompt pass serves both; it is charged to generation when there is one (as model.generate's
    # own prefill is), else to the loss.
    gen_s = spent["gen"] + (spent["prompt"] if with_generation else 0.0)
    loss_s = spent["loss"] + (0.0 if with_generation else spent["prompt"])
    return Decoded(tokens, sums if with_loss else None, counts if with_loss else None, gen_s, loss_s,
                   spent["prompt"])


def _prefill(body: Any, config: Any, batch: list[Example], pad_id: int, room: int,
             ) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The prompts through the decoder, into one cache where each row is left-padded to the longest
    prompt and ``room`` positions are free; returns the cache, each row's last hidden state and the
    attention mask over the cache's positions.

    The forward passes run ``PREFILL_GROUP`` rows of similar length at a time: a pass costs its padded
    tokens, and a batch sized for decoding holds prompts of very different lengths (batching 64 of
    MTS-Dialog's prompts computed 1.8x their tokens). The groups' states are then placed side by side."""
    from transformers import StaticCache

    width = max(len(ex.prompt_ids) for ex in batch)
    mask = torch.zeros((len(batch), width + room), dtype=torch.long)
    for j, ex in enumerate(batch):
        mask[j, width - len(ex.prompt_ids):width] = 1
    states: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    last = []
    for group in _batches(list(range(len(batch))), PREFILL_GROUP):
        w = max(len(batch[j].prompt_ids) for j in group)
        ids = torch.full((len(group), w), pad_id, dtype=torch.long)
        for r, j in enumerate(group):
            ids[r, w - len(batch[j].prompt_ids):] = torch.tensor(batch[j].prompt_ids)
        part_mask = mask[group, width - w:width]
        cache = StaticCache(config=config, max_cache_len=w)
        hidden = body(input_ids=ids, attention_mask=part_mask, position_ids=_positions(part_mask),
                      past_key_values=cache, cache_position=torch.arange(w), use_cache=True).last_hidden_state
        last.append(hidden[:, -1])
        layers: list[Any] = list(cache.layers)  # static layers (supported() checked): keys and values set
        states.append([(layer.keys, layer.values) for layer in layers])
    cache = _filled_cache(config, width + room)
    full: list[Any] = list(cache.layers)
    for i, layer in enumerate(full):
        k0, v0 = states[0][i]
        keys = k0.new_zeros((len(batch), k0.shape[1], width, k0.shape[3]))
        values = v0.new_zeros((len(batch), v0.shape[1], width, v0.shape[3]))
        row = 0
        for state in states:
            k, v = state[i]
            keys[row:row + len(k), :, width - k.shape[2]:] = k
            values[row:row + len(v), :, width - v.shape[2]:] = v
            row += len(k)
        layer.update(keys, values)  # the layer's own write: positions 0..width-1, as a prefill would
    return cache, torch.cat(last), mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows (as model.generate derives them from the attention mask)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _reference_losses(body: Any, head: Any, config: Any, cache: Any, last: torch.Tensor, prompt_mask: torch.Tensor,
                      batch: list[Example], pad_id: int) -> list[tuple[int, tuple[float, int]]]:
    """Summed cross-entropy of each reference given its prompt, and its token count. The first
    reference token is predicted from the prompt's last state; the rest from a pass over the
    reference (all tokens but the last) on a fork of the prompt cache, rows grouped by length."""
    out = []
    width = max(len(ex.prompt_ids) for ex in batch)
    by_length = sorted(range(len(batch)), key=lambda j: -len(batch[j].target_ids))
    for group in _batches(by_length, LOSS_GROUP):
        room = len(batch[group[0]].target_ids) - 1
        rows = torch.tensor(group)
        states = [last[rows][:, None]]
        if room > 0:
            fork = _fork(cache, rows, width, config, room)
            ids = torch.full((len(group), room), pad_id, dtype=torch.long)
            mask = torch.cat([prompt_mask[rows, :width], torch.zeros((len(group), room), dtype=torch.long)], 1)
            for k, j in enumerate(group):
                r = len(batch[j].target_ids) - 1
                ids[k, :r] = torch.tensor(batch[j].target_ids[:-1])
                mask[k, width:width + r] = 1
            pos = _positions(mask)[:, width:]
            states.append(body(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=fork,
                               cache_position=torch.arange(width, width + room), use_cache=True).last_hidden_state)
        hidden = torch.cat(states, 1)
        for k, j in enumerate(group):
            target = torch.tensor(batch[j].target_ids)
            logits = head(hidden[k, :len(target)]).float()
            out.append((j, (float(F.cross_entropy(logits, target, reduction="sum")), len(target))))
    return out


def _greedy(body: Any, head: Any, cache: Any, last: torch.Tensor, mask: torch.Tensor, width: int,
            max_new_tokens: int, eos_id: int, rows: int) -> list[list[int]]:
    """Greedy continuation of each prompt, without its end token. Finished rows stay in the batch
    (their tokens are ignored) until at least ``1/COMPACT`` of it has finished; then they leave it."""
    out: list[list[int]] = [[] for _ in range(rows)]
    held = list(range(rows))  # batch rows in the cache, in cache row order
    done: set[int] = set()
    step_pos = mask[:, :width].sum(-1)
    logits = head(last)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        for k, row in enumerate(held):
            if row in done:
                continue
            token = int(nxt[k])
            if token == eos_id:
                done.add(row)
            else:
                out[row].append(token)
        live = [k for k, row in enumerate(held) if row not in done]
        if not live or step == max_new_tokens - 1:
            break
        if len(held) - len(live) >= max(1, len(held) // COMPACT):  # the finished rows' cache rows go with them
            sel = torch.tensor(live)
            cache.reorder_cache(sel)
            mask, step_pos, nxt = mask[sel], step_pos[sel], nxt[sel]
            held = [held[k] for k in live]
        at = width + step
        mask[:, at] = 1
        hidden = body(input_ids=nxt[:, None], attention_mask=mask[:, :at + 1], position_ids=step_pos[:, None],
                      past_key_values=cache, cache_position=torch.tensor([at]), use_cache=True).last_hidden_state
        step_pos += 1
        logits = head(hidden[:, -1])
    return out


# Finished rows leave the batch once they are this fraction of it (1/4): each departure copies the cache.
COMPACT = 4
