"""``python -m bench.eval_speed``: the evaluation's two decoders side by side on the default trial's
model and eval examples, in one process, interleaved (hf, fast, hf, fast, ...), with repeats.

    python -m bench.eval_speed [--rounds 2] [--examples 20] [--readme README.md] [OVERRIDE ...]

Per decoder and round: generation tokens/s (the end token counted, as eval/gen_tokens_per_s), the
seconds of the eval loss and of generation, and how many generated summaries are identical to the
hf decoder's (model.generate, the reference). The model is the untuned base (what the baseline
scores), fp32 unless overridden. The machine is measured too: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.trial_config import load
from src import hw
from src.config import compose
from src.paths import PROJECT_ROOT

DECODERS = ("hf", "fast")


def measure(rounds: int, examples: int, overrides: list[str], hf_batch_size: int) -> dict[str, Any]:
    import torch
    from omegaconf import OmegaConf

    from src import evaluate

    cfg = compose([*overrides, f"eval.num_examples={examples}", "eval.metrics=[loss,rouge]"])
    torch.set_num_threads(hw.usable_cores())
    tok, net, facts, builder, _, eval_ex = load(cfg, examples)
    runs: dict[str, list[dict[str, float]]] = {d: [] for d in DECODERS}
    texts: dict[str, list[str]] = {}
    for r in range(rounds):
        for decoder in DECODERS:
            ecfg = OmegaConf.merge(cfg.eval, {"decoder": decoder, **({"batch_size": hf_batch_size}
                                                                      if decoder == "hf" else {})})
            timings: dict[str, float] = {}
            scores, rows = evaluate.evaluate(net, tok, eval_ex, ecfg, int(tok.pad_token_id),
                                             builder.eos_id, cfg.train.batch_size, timings)
            texts[decoder] = [row["prediction"] for row in rows]
            runs[decoder].append({"gen_tokens_per_s": scores["eval/gen_tokens_per_s"],
                                  "eval_gen_s": timings["eval_gen_s"], "eval_loss_s": timings["eval_loss_s"],
                                  "eval_loss": scores["eval/loss"],
                                  # the fast decoder's prompt pass (inside eval_gen_s); hf's is not separable
                                  "eval_prompt_s": timings.get("eval_prompt_s", float("nan"))})
            print(f"round {r + 1} {decoder}: {json.dumps(runs[decoder][-1])}", file=sys.stderr, flush=True)
    identical = sum(a == b for a, b in zip(texts["hf"], texts["fast"], strict=True))
    summary = {d: {k: {"median": statistics.median(x[k] for x in rs), "min": min(x[k] for x in rs),
                       "max": max(x[k] for x in rs)} for k in rs[0]} for d, rs in runs.items()}
    return {"model": facts.get("name"), "examples": len(eval_ex), "rounds": rounds,
            "batch_size": {"hf": hf_batch_size, "fast": int(cfg.eval.batch_size)},
            "identical_summaries": identical, "runs": runs, "summary": summary}


def table(report: dict[str, Any]) -> str:
    s, m = report["summary"], report["machine"]
    rows = [("generation tokens/s", "gen_tokens_per_s", True), ("generation, s", "eval_gen_s", False),
            ("eval loss, s", "eval_loss_s", False)]
    prompt = s["fast"]["eval_prompt_s"]
    lines = [f"Machine: {m['model']}, {m['usable_cores']} usable cores. {report['model']}, fp32, "
             f"{report['examples']} validation examples, batch {report['batch_size']['hf']} (hf) and "
             f"{report['batch_size']['fast']} (fast), "
             f"{report['rounds']} interleaved rounds; {report['identical_summaries']}/{report['examples']} "
             f"generated summaries identical; eval loss {s['hf']['eval_loss']['median']:.6f} (hf) vs "
             f"{s['fast']['eval_loss']['median']:.6f} (fast). Measured {report['finished_at'][:10]} by "
             f"`{report['invocation']}`.", "",
             "| quantity | hf (model.generate) | fast | fast vs hf |", "|---|---|---|---|"]
    for label, key, higher in rows:
        a, b = s["hf"][key], s["fast"][key]
        gain = b["median"] / a["median"] if higher else a["median"] / b["median"]
        cells = [f"{x['median']:.3g} ({x['min']:.3g}-{x['max']:.3g})" for x in (a, b)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {gain:.2f}x |")
    lines.append(f"| of the fast generation: the prompt pass, s | - | {prompt['median']:.3g} "
                 f"({prompt['min']:.3g}-{prompt['max']:.3g}) | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--examples", type=int, default=20, help="eval examples (the first N of the eval file)")
    p.add_argument("--hf-batch-size", type=int, default=10,
                   help="the hf decoder's batch (10: its default before the fast decoder)")
    p.add_argument("--out", type=Path, help="write the JSON here too")
    p.add_argument("--readme", type=Path, help="write the table between this file's eval_speed markers")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.examples < 1:
        p.error("--rounds and --examples: give at least 1")
    report = measure(a.rounds, a.examples, a.overrides, a.hf_batch_size)
    report.update(machine=hw.probe(), finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
                  invocation=" ".join(["python -m bench.eval_speed", *(sys.argv[1:] if argv is None else argv)]))
    text = table(report)
    print(text)
    out = a.out or PROJECT_ROOT / "bench" / "results" / "eval_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if a.readme:
        from analysis.ratios import replace_block

        a.readme.write_text(replace_block(a.readme.read_text(), text, "eval_speed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
