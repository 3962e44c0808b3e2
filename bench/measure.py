"""From a benchmark sweep's trial records to the numbers the benchmark reports (pure functions).

Per trial: training tokens/s (median over the steps after warm-up, real tokens only, from
train_log.jsonl), MFU, peak RSS, eval generation tokens/s, the share of the trial's wall time spent
generating, and the sweep overhead (everything that is not training or evaluation). Per engine: the
median and range of each, and the ratios of our loop to transformers.Trainer.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from src import metrics as M
from src import results

# Model FLOPs per trained token: forward 2N, backward through the frozen weights to the LoRA inputs
# 2N (their weight gradients are skipped). Full fine-tuning would be 6N (weight gradients too).
LORA_FLOPS_PER_PARAM = 4
WARMUP_STEPS = 2  # the first steps pay for allocations and MKL's kernel choice


def step_tokens_per_s(trial_dir: Path, warmup: int = WARMUP_STEPS) -> list[float]:
    """Per-step training tokens/s after warm-up, from the trial's train_log.jsonl."""
    rows = results.read_train_log(trial_dir)
    values = [float(r[M.TRAIN_TOKENS_PER_S]) for r in rows if int(r["step"]) > warmup]
    if not values:
        raise ValueError(f"{trial_dir}: no training step after the {warmup} warm-up steps; raise train.max_steps")
    return values


def trial_numbers(record: dict[str, Any], trial_dir: Path, gemm_gflops: float,
                  gap_s: float = 0.0) -> dict[str, float]:
    """The benchmark's quantities for one completed trial.

    ``gap_s``: this trial's share of the sweep's time outside any worker (Hydra, the sweeper, tracking);
    it counts as overhead, as does everything in the trial outside training and evaluation except the
    shared untuned-model baseline (computed once per model and data, then cached).
    """
    t, m = record["timings"], record["metrics"]
    tok_s = statistics.median(step_tokens_per_s(trial_dir))
    n_params = int(record["run"]["model"]["n_params"])
    wall = float(t["trial_wall_s"]) - float(t.get("baseline_s", 0.0)) + gap_s
    work = float(t["train_s"]) + float(t["eval_s"])
    return {
        "train_tokens_per_s": tok_s,
        "mfu": LORA_FLOPS_PER_PARAM * n_params * tok_s / (gemm_gflops * 1e9),
        "peak_rss_mb": float(m[M.COST_PEAK_RSS_MB]),
        "eval_gen_tokens_per_s": float(m.get(M.EVAL_GEN_TOKENS_PER_S, float("nan"))),
        "eval_gen_fraction": float(t.get("eval_gen_s", float("nan"))) / wall,
        "eval_fraction": float(t["eval_s"]) / wall,
        "overhead_fraction": (wall - work) / wall,
        "trial_wall_s": wall,
    }


def summarize(per_trial: dict[str, list[dict[str, float]]], reference: str = "hf_trainer",
              subject: str = "loop") -> dict[str, Any]:
    """Median, min and max of each quantity per engine, and subject / reference ratios of the medians."""
    engines: dict[str, Any] = {}
    for engine, rows in per_trial.items():
        engines[engine] = {"n": len(rows)}
        for key in rows[0]:
            values = [r[key] for r in rows]
            engines[engine][key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    ratios = {}
    if reference in engines and subject in engines:
        for key in ("train_tokens_per_s", "peak_rss_mb", "eval_gen_tokens_per_s", "trial_wall_s"):
            ratios[key] = engines[subject][key]["median"] / engines[reference][key]["median"]
        # Ratios of each interleaved pair: their spread says how much the noise could move the median.
        pairs = [a["train_tokens_per_s"] / b["train_tokens_per_s"]
                 for a, b in zip(per_trial[subject], per_trial[reference], strict=False)]
        ratios["train_tokens_per_s_pairs"] = pairs
    return {"engines": engines, "ratios": ratios}


TARGETS = {  # what the benchmark is held to (README "Speed"); checked, never asserted in tests
    "train tokens/s vs Trainer": (">=", 1.5),
    "peak RSS vs Trainer": ("<=", 1.0),
    "MFU (fp32, of measured GEMM peak)": (">=", 0.55),  # 0.5 until the Xeon study of fused projections
    "eval generation share of trial wall": ("<=", 0.25),
    "sweep overhead share of trial wall": ("<=", 0.05),
}


def verdicts(summary: dict[str, Any], subject: str = "loop") -> list[dict[str, Any]]:
    """Each target with the measured value and whether it is met."""
    own, ratios = summary["engines"][subject], summary["ratios"]
    measured = {
        "train tokens/s vs Trainer": ratios.get("train_tokens_per_s"),
        "peak RSS vs Trainer": ratios.get("peak_rss_mb"),
        "MFU (fp32, of measured GEMM peak)": own["mfu"]["median"],
        "eval generation share of trial wall": own["eval_gen_fraction"]["median"],
        "sweep overhead share of trial wall": own["overhead_fraction"]["median"],
    }
    out = []
    for name, (op, goal) in TARGETS.items():
        value = measured[name]
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"target": name, "goal": f"{op} {goal:g}", "measured": value, "met": met})
    return out
