"""The training loop: AdamW on the trainable (LoRA) weights, a warm-up + decay schedule, gradient
accumulation and clipping, an optional time budget, and a progress bar with loss and tokens/s.

A plain loop rather than transformers.Trainer: it is short, runs in the worker without Trainer's
accelerate/logging machinery, and counts real (non-padding) tokens for tokens/s.
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
from tqdm import tqdm
from transformers import get_scheduler

from src import metrics as M
from src.data import Example


@dataclass
class TrainStats:
    steps: int = 0
    tokens: int = 0
    train_s: float = 0.0
    stopped_by: str = "max_steps"
    losses: list[float] = field(default_factory=list)

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


def batches(examples: list[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless stream of micro-batches, reshuffled every epoch with a seeded generator."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]


def total_steps(tcfg: Any, n_examples: int) -> int:
    if tcfg.max_steps is not None:
        return int(tcfg.max_steps)
    per_epoch = math.ceil(math.ceil(n_examples / tcfg.batch_size) / tcfg.grad_accum)
    return max(1, math.ceil(tcfg.epochs * per_epoch))


def train(model: Any, examples: list[Example], tcfg: Any, pad_id: int,
          on_log: Callable[[dict[str, float]], None]) -> TrainStats:
    steps = total_steps(tcfg, len(examples))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = get_scheduler(str(tcfg.scheduler), optimizer, num_warmup_steps=int(tcfg.warmup_ratio * steps),
                              num_training_steps=steps)
    if tcfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    stream = batches(examples, tcfg.batch_size, tcfg.seed)
    stats = TrainStats()
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        step_loss, step_tokens = 0.0, 0
        for _ in range(tcfg.grad_accum):
            batch = collate(next(stream), pad_id)
            loss = model(**batch).loss
            (loss / tcfg.grad_accum).backward()
            step_loss += loss.item() / tcfg.grad_accum
            step_tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"train/loss became {step_loss} at step {step}: training diverged; "
                                     "lower train.lr or set train.max_grad_norm")
        if tcfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        stats.steps, stats.tokens = step, stats.tokens + step_tokens
        stats.losses.append(step_loss)
        stats.train_s = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{step_tokens / dt:.0f}")
        if step % tcfg.log_every == 0 or step == steps:
            on_log({"step": step, M.TRAIN_LOSS: step_loss, M.TRAIN_TOKENS_PER_S: step_tokens / dt,
                    "train/lr": scheduler.get_last_lr()[0], "train/elapsed_s": stats.train_s})
        if tcfg.time_budget_s is not None and stats.train_s >= tcfg.time_budget_s and step < steps:
            stats.stopped_by = "time_budget"
            break
    bar.close()
    if tcfg.gradient_checkpointing:
        model.activation_checkpointing_disable()
    model.eval()
    return stats
