"""The training loop: AdamW on the trainable (LoRA) weights, a warm-up + decay schedule, gradient
accumulation and clipping, an optional time budget, and a progress bar with loss and tokens/s.

A plain loop rather than transformers.Trainer (``train.engine=hf_trainer`` runs that instead, for
comparison: src/hf_engine.py), because of two things Trainer does not do, measured by the benchmark
(python -m bench): the vocabulary projection and cross-entropy run only where a summary token is
predicted (``target_loss``), and micro-batches are grouped by length (``train.group_by_length``) so
that little of each batch is padding. It counts real (non-padding) tokens for tokens/s.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_scheduler

from src import adapters
from src import metrics as M
from src.data import Example


@dataclass
class TrainStats:
    steps: int = 0
    tokens: int = 0
    train_s: float = 0.0
    stopped_by: str = "max_steps"
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)       # wall seconds of each optimizer step
    step_tokens: list[int] = field(default_factory=list)    # real tokens of each optimizer step
    step_end: list[float] = field(default_factory=list)     # time.perf_counter() at each step's end

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10% of steps (at least one): less noisy than the last step alone."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s if self.train_s > 0 else 0.0


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch; padding and prompt positions get label -100."""
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(ex.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _length_grouped(lengths: list[int], batch_size: int, rng: random.Random, per_group: int = 50) -> list[list[int]]:
    """One epoch of index batches of similar length, in random order.

    Like transformers' LengthGroupedSampler (random groups of ``per_group`` batches, each sorted by
    length and cut into batches), except that the batches are then shuffled: that sampler puts every
    group's longest batches first, so a run of a few dozen steps would train, and measure its
    tokens/s, mostly on the longest examples.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = per_group * batch_size
    out: list[list[int]] = []
    for start in range(0, len(order), size):
        group = sorted(order[start:start + size], key=lambda i: lengths[i])
        out.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(out)
    return out


def batches(examples: list[Example], batch_size: int, seed: int, by_length: bool = False,
            ) -> Iterator[list[Example]]:
    """Endless stream of micro-batches, reshuffled every epoch with a seeded generator; ``by_length``:
    each batch holds examples of similar length, so little of it is padding (same examples per epoch)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    lengths = [len(ex.input_ids) for ex in examples]
    while True:
        if by_length:
            for idx in _length_grouped(lengths, batch_size, rng):
                yield [examples[j] for j in idx]
            continue
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]


# Config attributes of models whose logits are transformed after the vocabulary projection (soft
# capping, scaling): target_loss would skip that, so those models take the plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def body_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder body and the vocabulary head to run apart, or None where the model must run whole:
    its logits are transformed after the head, or peft adds virtual tokens around the base (prompt
    and prefix tuning: the body alone would never see them)."""
    if adapters.is_prompt_learning(model):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or any(getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    try:
        body, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    if body is None or head is None or body is base:
        return None
    return body, head


def label_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits of the positions that predict a label (summary token), those labels, and each
    position's row in the batch.

    The causal-LM head projects every position onto the whole vocabulary (49k columns for SmolLM2)
    and the loss then discards the prompt positions' logits. Here the decoder body runs on the whole
    sequence, and the projection only on the positions that predict a label: for a dialogue-to-summary
    task most positions are prompt, so this saves most of the head's matmuls and the largest
    activation of the step. Models without a separable body/head take the plain forward.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    parts = body_and_head(model)
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # prompt tuning's virtual tokens come first in the logits; the real positions follow them
        logits = logits[:, adapters.prepended_positions(model):][:, :-1][keep]
    else:
        body, head = parts
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    return logits, labels[keep], keep.nonzero()[:, 0]


def target_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (summary) positions, as ``model(**batch).loss``
    (which a model without a separable body/head computes itself, its own way)."""
    if body_and_head(model) is None:
        return model(**batch).loss  # peft's model adds a method's own penalty (AdaLoRA's) to this loss
    logits, targets, _ = label_logits(model, batch)
    return F.cross_entropy(logits.float(), targets) + adapters.regularizer(model)


def total_steps(tcfg: Any, n_examples: int) -> int:
    if tcfg.max_steps is not None:
        return int(tcfg.max_steps)
    per_epoch = math.ceil(math.ceil(n_examples / tcfg.batch_size) / tcfg.grad_accum)
    return max(1, math.ceil(tcfg.epochs * per_epoch))


def train(model: Any, examples: list[Example], tcfg: Any, pad_id: int,
          on_log: Callable[[dict[str, float]], None], on_step: Callable[[int], bool] | None = None) -> TrainStats:
    """``on_step(step)``, after each optimizer step (the pruning signal): True stops training there
    (``stopped_by="pruned"``); its own time is not training time."""
    steps = total_steps(tcfg, len(examples))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = get_scheduler(str(tcfg.scheduler), optimizer, num_warmup_steps=int(tcfg.warmup_ratio * steps),
                              num_training_steps=steps)
    if tcfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    after_optimizer_step = adapters.after_optimizer_step(model)  # AdaLoRA's rank allocation
    stream = batches(examples, tcfg.batch_size, tcfg.seed, by_length=bool(tcfg.group_by_length))
    stats = TrainStats()
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        step_loss, step_tokens = 0.0, 0
        for _ in range(tcfg.grad_accum):
            batch = collate(next(stream), pad_id)
            loss = target_loss(model, batch)
            (loss / tcfg.grad_accum).backward()
            step_loss += loss.item() / tcfg.grad_accum
            step_tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"train/loss became {step_loss} at step {step}: training diverged; "
                                     "lower train.lr or set train.max_grad_norm")
        if tcfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        optimizer.step()
        if after_optimizer_step is not None:
            after_optimizer_step(step - 1)  # reads the gradients; counts steps from 0, as Trainer does
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        dt = end - t0
        stats.step_end.append(end)
        stats.steps, stats.tokens = step, stats.tokens + step_tokens
        stats.losses.append(step_loss)
        stats.step_s.append(dt)
        stats.step_tokens.append(step_tokens)
        stats.train_s = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{step_tokens / dt:.0f}")
        if step % tcfg.log_every == 0 or step == steps:
            on_log({"step": step, M.TRAIN_LOSS: step_loss, M.TRAIN_TOKENS_PER_S: step_tokens / dt,
                    M.TRAIN_STEP_S: dt, "train/lr": scheduler.get_last_lr()[0], "train/elapsed_s": stats.train_s})
        if tcfg.time_budget_s is not None and stats.train_s >= tcfg.time_budget_s and step < steps:
            stats.stopped_by = "time_budget"
            break
        if on_step is not None:
            t_hook = time.perf_counter()
            stop = on_step(step)
            start += time.perf_counter() - t_hook  # train_s counts training only
            if stop:
                stats.stopped_by = "pruned"
                break
    bar.close()
    if tcfg.gradient_checkpointing:
        model.activation_checkpointing_disable()
    model.eval()
    return stats
