"""``train.engine=hf_trainer``: the same trial trained by ``transformers.Trainer``, the path a typical
user writes (peft model + Trainer + DataCollatorForSeq2Seq), as the yardstick for our loop.

Trainer keeps its defaults (optimizer, data loading, full-vocabulary loss, no length grouping) apart
from what makes it the same trial: batch size, steps, the optimisation hyperparameters of
``train`` (which change the result, not the speed), and housekeeping (no checkpoints, no reporting to
an online service, output inside the trial folder). It reports through the same ``on_log`` rows and
``TrainStats`` as src/loop.py, counting real (non-padding) tokens per optimizer step.
"""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import Any

from src import adapters
from src import metrics as M
from src.data import Example
from src.loop import TrainStats, total_steps


def _arguments(tcfg: Any, steps: int, out_dir: Path) -> Any:
    from transformers import TrainingArguments

    accepted = inspect.signature(TrainingArguments.__init__).parameters
    kwargs: dict[str, Any] = {
        "output_dir": str(out_dir), "per_device_train_batch_size": int(tcfg.batch_size), "max_steps": steps,
        "gradient_accumulation_steps": int(tcfg.grad_accum), "learning_rate": float(tcfg.lr),
        "lr_scheduler_type": str(tcfg.scheduler), "weight_decay": float(tcfg.weight_decay),
        "max_grad_norm": float(tcfg.max_grad_norm or 0.0), "seed": int(tcfg.seed),
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
        # Trainer's own count of non-padding tokens: what tokens/s is computed from.
        "include_num_input_tokens_seen": "non_padding",
    }
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    ckpt = "activation_checkpointing" if "activation_checkpointing" in accepted else "gradient_checkpointing"
    kwargs[ckpt] = bool(tcfg.gradient_checkpointing)
    if tcfg.gradient_checkpointing:
        kwargs[f"{ckpt}_kwargs"] = {"use_reentrant": False}
    # transformers 5 takes a warm-up ratio as a float warmup_steps; 4.x (the ipex-llm environment) as warmup_ratio.
    kwargs["warmup_ratio" if "warmup_ratio" in accepted else "warmup_steps"] = float(tcfg.warmup_ratio)
    return TrainingArguments(**kwargs)


def train(model: Any, tokenizer: Any, examples: list[Example], tcfg: Any, out_dir: Path,
          on_log: Any, on_step: Any = None) -> TrainStats:
    """``on_step``: as in loop.train (True stops training after that step; its time is not training's)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback

    steps = total_steps(tcfg, len(examples))
    stats = TrainStats()
    dataset = [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples]

    class Measure(TrainerCallback):  # type: ignore[misc]
        """Per optimizer step: wall time between step ends, real tokens from Trainer's own counter."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start = self.last = time.perf_counter()
            self.tokens_seen = 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            now = time.perf_counter()
            dt, self.last = now - self.last, now
            tokens = int(state.num_input_tokens_seen) - self.tokens_seen
            self.tokens_seen = int(state.num_input_tokens_seen)
            stats.steps, stats.tokens, stats.train_s = state.global_step, self.tokens_seen, now - self.start
            stats.step_s.append(dt)
            stats.step_tokens.append(tokens)
            stats.step_end.append(now)
            if tcfg.time_budget_s is not None and stats.train_s >= tcfg.time_budget_s and state.global_step < steps:
                stats.stopped_by = "time_budget"
                control.should_training_stop = True
            if on_step is not None and stats.stopped_by != "time_budget":  # as the loop: no report past the budget
                t_hook = time.perf_counter()
                if on_step(state.global_step):
                    stats.stopped_by = "pruned"
                    control.should_training_stop = True
                hook_s = time.perf_counter() - t_hook
                self.start += hook_s  # neither the step's time nor train_s includes the hook's
                self.last += hook_s
            self.pending: dict[str, Any] | None = {"step": state.global_step, M.TRAIN_TOKENS_PER_S: tokens / dt,
                                                   M.TRAIN_STEP_S: dt, "train/elapsed_s": stats.train_s}
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            # Called right after on_step_end with that step's loss (logging_steps=1).
            pending = getattr(self, "pending", None)
            if logs and "loss" in logs and pending:
                loss = float(logs["loss"])
                if not math.isfinite(loss):
                    raise FloatingPointError(f"train/loss became {loss} at step {state.global_step}: training "
                                             "diverged; lower train.lr or set train.max_grad_norm")
                stats.losses.append(loss)
                row = {**pending, M.TRAIN_LOSS: loss, "train/lr": float(logs.get("learning_rate", 0.0))}
                if row["step"] % tcfg.log_every == 0 or row["step"] == steps:
                    on_log(row)
                self.pending = None

    callbacks: list[Any] = [Measure()]
    after_optimizer_step = adapters.after_optimizer_step(model)
    if after_optimizer_step is not None:
        class MethodStep(TrainerCallback):  # type: ignore[misc]
            """What the PEFT method needs between the optimizer step and clearing the gradients
            (AdaLoRA's rank allocation): Trainer calls no method's hook itself."""

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                after_optimizer_step(state.global_step)  # not yet counted: 0 at the first step

        callbacks.append(MethodStep())
    trainer = Trainer(model=model, args=_arguments(tcfg, steps, out_dir), train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=callbacks)
    trainer.train()
    model.eval()
    return stats
