"""Which of our loop's speed-ups pay on this machine, each measured against the plain path in one
process, interleaved round by round:

    python -m bench.ablate [--steps 4] [--rounds 4] [--profile STEPS] [--readme FILE] [OVERRIDE ...]

Variants: the loss over the full vocabulary projection (``model(**batch).loss``, as Trainer does) or
on summary positions only (``loop.target_loss``), random or length-grouped micro-batches, and one
product for the LoRA projections that share an input (``train.fuse_projections``, src/fuse.py). Each
round runs ``--steps`` optimizer steps of every variant in turn on the same LoRA model; the first
round is warm-up. Printed: real tokens/s per variant (median of steps) and its ratio to the plain
variant. The process's own threads and allocator are used (start it with LD_PRELOAD to compare one).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.trial_config import load
from src.config import compose

VARIANTS = {  # name: (loss on targets only, length-grouped batches, fused shared-input projections)
    "plain (full-vocab loss, random batches)": (False, False, False),
    "loss on targets only": (True, False, False),
    "length-grouped batches": (False, True, False),
    "both (our loop)": (True, True, False),
    "both + fused projections": (True, True, True),
}
OUR_LOOP = "both (our loop)"


def run(overrides: list[str], steps: int, rounds: int, profile: int = 0) -> dict[str, list[float]]:
    import torch

    from src import adapters, fuse, loop

    cfg = compose(["logger=none", *overrides])
    tok, net, _, _, examples, _ = load(cfg)
    net = adapters.attach(net, cfg, steps * rounds * len(VARIANTS))  # the trial's own adapter set-up
    probe = torch.tensor([examples[0].input_ids[:8]])
    fused = fuse.apply(net, {"input_ids": probe, "attention_mask": torch.ones_like(probe)})
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(cfg.train.lr))
    pad_id, bs = int(tok.pad_token_id), int(cfg.train.batch_size)
    streams = {name: loop.batches(examples, bs, cfg.train.seed, by_length=grouped)
               for name, (_, grouped, _) in VARIANTS.items()}
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}

    def step(name: str, targets: bool) -> float:
        fused.enabled = VARIANTS[name][2]
        t0 = time.perf_counter()
        batch = loop.collate(next(streams[name]), pad_id)
        loss = loop.target_loss(net, batch) if targets else net(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum()) / (time.perf_counter() - t0)

    for r in range(rounds):
        for name, (targets, _, _) in VARIANTS.items():
            for _ in range(steps):
                rate = step(name, targets)
                if r > 0:  # round 0 is warm-up
                    rates[name].append(rate)
    if profile:
        # Where our loop's step time goes, by operator: the evidence for what limits MFU.
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        name = list(VARIANTS)[-1]
        print(f"profile of {name!r}, {profile} steps:")
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(profile):
                step(name, VARIANTS[name][0])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds (the first is warm-up)")
    p.add_argument("--readme", type=Path, help="also write the table between this file's "
                                               "<!-- ratios:ablation:begin/end --> markers")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="then profile this many steps of our loop with torch.profiler and print the top operators")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.rounds < 2 or a.steps < 1:
        p.error("--rounds: at least 2 (the first is warm-up); --steps: at least 1")
    rates = run(a.overrides, a.steps, a.rounds, a.profile)
    ref = statistics.median(rates[next(iter(VARIANTS))])
    ours = statistics.median(rates[OUR_LOOP])
    lines = ["| variant | real tokens/s (median) | min-max | x plain | x our loop |", "|---|---|---|---|---|"]
    for name, values in rates.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.1f} | {min(values):.0f}-{max(values):.0f} | {med / ref:.2f}x "
                     f"| {med / ours:.2f}x |")
    shown = " ".join(["python -m bench.ablate", f"--steps {a.steps}", f"--rounds {a.rounds}", *a.overrides])
    text = "\n".join([*lines, "", f"({(a.rounds - 1) * a.steps} steps per variant after warm-up: `{shown}`)"])
    print(text)
    if a.readme:
        from analysis.ratios import replace_block

        a.readme.write_text(replace_block(a.readme.read_text(), text, "ablation"))


if __name__ == "__main__":
    main()
