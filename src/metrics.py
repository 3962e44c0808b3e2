"""Metric names: one spelling, used by result.json, W&B, the sweep table and analysis."""

from __future__ import annotations

from collections.abc import Iterable

TRAIN_LOSS = "train/loss"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"
TRAIN_STEPS = "train/steps"
TRAIN_TOKENS = "train/tokens"
TRAIN_STEP_S = "train/step_s"  # per step, in train_log.jsonl only
TRAIN_PARAMS = "train/trainable_params"  # what the PEFT method trains (its size, whatever its knobs)

EVAL_LOSS = "eval/loss"
EVAL_LOSS_TOKENS = "eval/loss_tokens"  # per example only: the reference tokens its loss averages (its weight)
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
EVAL_ROUGE = tuple(f"eval/{k}" for k in ROUGE_KEYS)
EVAL_BERTSCORE_F1 = "eval/bertscore_f1"
EVAL_GEN_TOKENS_PER_S = "eval/gen_tokens_per_s"

COST_TRAIN_S = "cost/train_s"
# Training seconds at the median per-token step speed (src/interference.py): a time objective that a
# neighbour slowing some steps cannot inflate; cost/train_s stays the plain wall time.
COST_TRAIN_S_ROBUST = "cost/train_s_robust"
# Share of the machine's CPU time other processes used while the trial trained and evaluated.
COST_OTHERS_CPU_SHARE = "cost/others_cpu_share"
COST_EVAL_S = "cost/eval_s"
COST_TOTAL_S = "cost/total_s"
COST_PEAK_RSS_MB = "cost/peak_rss_mb"
# The peak while the adapter is attached and trained, without loading's: a safetensors checkpoint's
# mapped pages count in RSS until the loader closes its files, and on a quantized model they can be
# the trial's peak (src/cost.py PhasePeaks). Absent where the kernel cannot reset the peak.
COST_TRAIN_PEAK_RSS_MB = "cost/train_peak_rss_mb"
COST_USD = "cost/usd"
COST_ENERGY_WH = "cost/energy_wh"
COST_ADAPTER_MB = "cost/adapter_mb"

# Which metrics each eval.metrics family produces.
FAMILIES: dict[str, tuple[str, ...]] = {
    "loss": (EVAL_LOSS,),
    "rouge": EVAL_ROUGE,
    "bertscore": (EVAL_BERTSCORE_F1,),
}
# Quality metrics that the untuned model is also scored on (its "baseline/..." twins).
QUALITY = (EVAL_LOSS, *EVAL_ROUGE, EVAL_BERTSCORE_F1)

ALWAYS = (
    TRAIN_LOSS, TRAIN_TOKENS_PER_S, TRAIN_STEPS, TRAIN_TOKENS, TRAIN_PARAMS,
    COST_TRAIN_S, COST_EVAL_S, COST_TOTAL_S, COST_PEAK_RSS_MB, COST_USD, COST_ENERGY_WH, COST_ADAPTER_MB,
    COST_TRAIN_S_ROBUST, COST_TRAIN_PEAK_RSS_MB,
)
ALL = frozenset((*ALWAYS, *QUALITY, EVAL_GEN_TOKENS_PER_S))


def available(families: Iterable[str]) -> list[str]:
    """Metric names a trial reports given the eval metric families it computes."""
    fams = list(families)
    out = list(ALWAYS)
    for fam in fams:
        out.extend(FAMILIES[fam])
    if "rouge" in fams or "bertscore" in fams:
        out.append(EVAL_GEN_TOKENS_PER_S)
    return out


def baseline_name(metric: str) -> str:
    """eval/rougeL -> baseline/rougeL: the untuned model's score on the same examples."""
    return "baseline/" + metric.split("/", 1)[1]


def interval_name(name: str) -> str:
    """eval/rougeL -> eval/rougeL_ci95: where summaries that hold one number per key keep [low, high]."""
    return f"{name}_ci95"


def gain_name(metric: str) -> str:
    """eval/rougeL -> gain/rougeL: trained minus untuned (for eval/loss, a drop is a negative gain)."""
    return "gain/" + metric.split("/", 1)[1]
