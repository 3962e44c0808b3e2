"""Which of our loop's speed-ups pay on this machine, each measured against the plain path in one
process, interleaved round by round:

    python -m bench.ablate [--steps 4] [--rounds 4] [--profile STEPS] [--readme FILE [--block B]] [OVERRIDE ...]

Variants: the loss over the full vocabulary projection (``model(**batch).loss``, as Trainer does) or
on summary positions only (``loop.target_loss``), random or length-grouped micro-batches, one
product for the LoRA projections that share an input (``train.fuse_projections``, src/fuse.py), and,
on a CPU with bf16 matrix units (AMX or AVX512-BF16), the fp32 products run by oneDNN in bf16
(``torch.backends.mkldnn.matmul.fp32_precision="bf16"``: not the same arithmetic, shown for scale, not
offered as a setting). Each round runs ``--steps`` optimizer steps of every variant in turn on the same
LoRA model; the first round is warm-up. Printed: real tokens/s per variant (median of steps) and its
ratio to the plain variant and to our loop. The process's own threads and allocator are used: start it
with ``LD_PRELOAD=<libtcmalloc.so>`` to measure what a trial's worker runs (cpu.allocator=auto).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench.trial_config import load
from src.config import compose


@dataclass(frozen=True)
class Variant:
    targets: bool                 # the loss on summary positions only
    grouped: bool                 # length-grouped micro-batches
    fuse: bool = False            # one product for the LoRA projections that share an input
    matmul_bf16: bool = False     # oneDNN's bf16 products for fp32 tensors


VARIANTS = {
    "plain (full-vocab loss, random batches)": Variant(False, False),
    "loss on targets only": Variant(True, False),
    "length-grouped batches": Variant(False, True),
    "both, unfused (train.fuse_projections=false)": Variant(True, True),
    "both + fused projections (our loop, the default)": Variant(True, True, True),
}
OUR_LOOP = "both + fused projections (our loop, the default)"
BF16_MATMUL = "both + fused, fp32 products in bf16 (oneDNN)"


def variants() -> dict[str, Variant]:
    """The variants this CPU can run: the bf16 products only where bf16 has its own instructions."""
    from src import hw

    flags = hw.probe()["flags"]
    assert isinstance(flags, dict)
    extra = {BF16_MATMUL: Variant(True, True, True, True)} if flags.get("amx_bf16") or flags.get(
        "avx512_bf16") else {}
    return {**VARIANTS, **extra}


def run(todo: dict[str, Variant], overrides: list[str], steps: int, rounds: int,
        profile: int = 0) -> dict[str, list[float]]:
    import torch

    from src import adapters, fuse, loop

    cfg = compose(["logger=none", *overrides])
    tok, net, _, _, examples, _ = load(cfg)
    net = adapters.attach(net, cfg, steps * rounds * len(todo))  # the trial's own adapter set-up
    fused = fuse.apply_on(net, examples[0].input_ids)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(cfg.train.lr))
    pad_id, bs = int(tok.pad_token_id), int(cfg.train.batch_size)
    streams = {name: loop.batches(examples, bs, cfg.train.seed, by_length=v.grouped) for name, v in todo.items()}
    rates: dict[str, list[float]] = {name: [] for name in todo}
    matmul = torch.backends.mkldnn.matmul  # type: ignore[attr-defined]  # an object torch adds at import
    precision = matmul.fp32_precision

    def step(name: str) -> float:
        v = todo[name]
        fused.enabled = v.fuse
        matmul.fp32_precision = "bf16" if v.matmul_bf16 else precision
        t0 = time.perf_counter()
        batch = loop.collate(next(streams[name]), pad_id)
        loss = loop.target_loss(net, batch) if v.targets else net(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum()) / (time.perf_counter() - t0)

    try:
        for r in range(rounds):
            for name in todo:
                for _ in range(steps):
                    rate = step(name)
                    if r > 0:  # round 0 is warm-up
                        rates[name].append(rate)
        if profile:
            # Where the step's time goes, by operator, with every setting the trial's default has.
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            name = OUR_LOOP
            print(f"profile of {name!r}, {profile} steps:")
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(profile):
                    step(name)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    finally:
        matmul.fp32_precision = precision
    return rates


def paired(a: list[float], b: list[float]) -> float:
    """The median of step-by-step ratios a[k] / b[k]: variants with the same batches see the same k-th
    batch, so each ratio compares like with like, and a slow moment of the machine falls on one pair."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def table(rates: dict[str, list[float]], todo: dict[str, Variant], command: str, allocator: str = "system") -> str:
    ref_name = next(iter(rates))
    ref, ours = statistics.median(rates[ref_name]), statistics.median(rates[OUR_LOOP])
    lines = ["| variant | real tokens/s (median) | min-max | x plain | x our loop |", "|---|---|---|---|---|"]
    for name, values in rates.items():
        med = statistics.median(values)
        # same batches as our loop (length-grouped): paired step ratios; else the ratio of medians
        vs_ours = paired(values, rates[OUR_LOOP]) if todo[name].grouped == todo[OUR_LOOP].grouped else med / ours
        vs_ref = paired(values, rates[ref_name]) if todo[name].grouped == todo[ref_name].grouped else med / ref
        lines.append(f"| {name} | {med:.1f} | {min(values):.0f}-{max(values):.0f} | {vs_ref:.2f}x | {vs_ours:.2f}x |")
    n = len(rates[OUR_LOOP])
    return "\n".join([*lines, "", f"({n} steps per variant after warm-up, {allocator} malloc; a ratio between "
                                  "variants with the same batches is the median of their step-by-step ratios: "
                                  f"`{command}`)"])


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds (the first is warm-up)")
    p.add_argument("--readme", type=Path, help="also write the table between this file's "
                                               "<!-- ratios:BLOCK:begin/end --> markers")
    p.add_argument("--block", default="ablation",
                   help="with --readme: the markers' BLOCK (default ablation; this project's README keeps one "
                        "block per CPU: ablation_xeon, ablation_epyc)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="then profile this many steps of our loop with torch.profiler and print the top operators")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.rounds < 2 or a.steps < 1:
        p.error("--rounds: at least 2 (the first is warm-up); --steps: at least 1")
    if a.readme:
        from bench import check_readme_block

        check_readme_block(p, a.readme, a.block)
    todo = variants()
    rates = run(todo, a.overrides, a.steps, a.rounds, a.profile)
    from src import hw

    # the allocator is the process's own: a trial's worker preloads tcmalloc (cpu.allocator=auto), and
    # glibc's malloc made each elementwise op here 2-4x slower, so say which one ran and how
    preload = os.environ.get("LD_PRELOAD")
    command = " ".join([*([f"LD_PRELOAD={preload}"] if preload else []), "python -m bench.ablate",
                        f"--steps {a.steps}", f"--rounds {a.rounds}", *a.overrides])
    text = table(rates, todo, command, hw.allocator_in_effect())
    print(text)
    if a.readme:
        from analysis.ratios import replace_block

        a.readme.write_text(replace_block(a.readme.read_text(), text, a.block))


if __name__ == "__main__":
    main()
