"""Which process-wide settings pay for our training loop on this machine: each variant runs in its own
worker process, started exactly as a trial's worker is (its environment from ``src.runtime.worker_env``,
its pinning from ``src.cpu.preexec``), and the variants take turns, round by round:

    python -m bench.ablate_cpu --variant NAME=SETTINGS [--variant ...] [--steps 4] [--rounds 4]
                               [--readme FILE] [OVERRIDE ...]

SETTINGS: space-separated Hydra overrides for that variant (``cpu.allocator=tcmalloc``,
``cpu.threads=1``) and environment variables (upper-case names: ``GLIBC_TUNABLES=...``), e.g.
``--variant "tcmalloc=cpu.allocator=tcmalloc"``. The allocator, the thread pools and the instruction
set are fixed when a process starts, which is why ``bench.ablate`` (one process) cannot compare them.

Each round, every variant runs ``--steps`` optimizer steps of ``src.loop.train`` itself (the trial's
own loop: loss on targets, length-grouped batches, clipping, scheduler) on its own copy of the same
LoRA model and batches; the first round is warm-up, and so is each round's first step (it allocates
the optimizer's state). Printed: real tokens/s per variant (median of steps) and its ratio to the
first variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.trial_config import load
from src.config import compose


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    """``NAME=SETTINGS`` into its name, its Hydra overrides and its environment variables."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--variant {text!r}: expected NAME=SETTINGS, e.g. 'tcmalloc=cpu.allocator=tcmalloc'")
    overrides, env = [], {}
    for item in rest.split():
        key, eq, value = item.partition("=")
        if eq and key.isupper():
            env[key] = value
        else:
            overrides.append(item)
    return name.strip(), overrides, env


# Settings a shell may carry that would change a variant behind its back: the worker's own environment
# sets what the variant asks for, on top of an environment without them.
_INHERITED = ("LD_PRELOAD", "GLIBC_TUNABLES", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY",
              "OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY")
PROTOCOL = "ablate_cpu: "  # the prefix of the child's answers; any other line on its stdout is passed through


def check(cfg: Any) -> None:
    """What the child does not reproduce is refused, not silently measured as something else."""
    from src import quant

    if quant.active(cfg.quant) or str(cfg.train.engine) != "loop":
        raise ValueError("bench.ablate_cpu measures the fp32/bf16 base with our loop: drop quant=... and "
                         "train.engine=...")


class Worker:
    """One variant's process: ``python -m bench.ablate_cpu --child``, driven over its stdin/stdout."""

    def __init__(self, name: str, overrides: list[str], extra_env: dict[str, str]) -> None:
        from src import cpu, runtime

        cfg = compose(["logger=none", *overrides])  # a bad override is named before anything starts
        check(cfg)
        base = {k: v for k, v in os.environ.items() if k not in _INHERITED and not k.startswith("MALLOC_")}
        env = {**runtime.worker_env(cfg, base), **extra_env}
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.ablate_cpu", "--child", *overrides],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=runtime.limits(cfg.train.memory_limit_mb, then=cpu.preexec(cfg.cpu)))
        self.facts = self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line.removeprefix(PROTOCOL))
            sys.stderr.write(line)  # a library's own output on fd 1
        raise RuntimeError(f"variant {self.name!r}: its process ended (exit code {self.proc.wait()}); "
                           "its error is above")

    def steps(self, n: int) -> list[float]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{n}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it has ended: _read says so, with its exit code
        return [float(x) for x in self._read()]

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def child(overrides: list[str]) -> None:
    """Load the trial's model and adapter, say what is in effect, then run ``N`` steps per line read."""
    # Answers go to a copy of fd 1; fd 1 itself (where C libraries print) goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def answer(value: Any) -> None:
        out.write(PROTOCOL + json.dumps(value) + "\n")
        out.flush()

    import torch
    from omegaconf import OmegaConf

    from src import adapters, fuse, hw, loop
    from src.worker import _precision, set_threads

    cfg = compose(["logger=none", *overrides])
    set_threads(cfg.cpu)  # as the trial's worker does, from the environment its parent set
    tok, net, _, _, examples, _ = load(cfg)
    net = adapters.attach(net, cfg, 1000)
    if cfg.train.fuse_projections:  # as the trial's worker trains
        fuse.apply_on(net, examples[0].input_ids)
    malloc_env = {k: v for k, v in os.environ.items() if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")}
    answer({"allocator": hw.allocator_in_effect(), "threads": torch.get_num_threads(), "malloc_env": malloc_env})
    for line in sys.stdin:
        tcfg = OmegaConf.merge(cfg.train, {"max_steps": int(line)})
        with _precision(str(cfg.cpu.dtype)):  # as the trial's worker trains
            stats = loop.train(net, examples, tcfg, int(tok.pad_token_id), lambda row: None)
        rates = [n / s for n, s in zip(stats.step_tokens, stats.step_s, strict=True)]
        answer(rates[1:])  # the first step allocates the optimizer's state


def run(variants: list[tuple[str, list[str], dict[str, str]]], overrides: list[str], steps: int,
        rounds: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Tokens/s of every step after warm-up, per variant, and what each process had in effect."""
    workers: list[Worker] = []
    rates: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    try:
        for name, own, env in variants:
            workers.append(Worker(name, [*overrides, *own], env))
        for r in range(rounds):
            for w in workers:
                got = w.steps(steps)
                print(f"round {r + 1} {w.name}: {' '.join(f'{x:.1f}' for x in got)} tokens/s",
                      file=sys.stderr, flush=True)
                if r > 0:  # round 0 is warm-up
                    rates[w.name] += got
    finally:
        for w in workers:
            w.close()
    return rates, {w.name: w.facts for w in workers}


def table(rates: dict[str, list[float]], facts: dict[str, Any], shown: str) -> str:
    ref = statistics.median(next(iter(rates.values())))
    lines = ["| variant | in effect | real tokens/s (median) | min-max | x first |", "|---|---|---|---|---|"]
    for name, values in rates.items():
        med = statistics.median(values)
        got = facts[name]
        tuned = "".join(f", {k}={v}" for k, v in got["malloc_env"].items())
        lines.append(f"| {name} | {got['allocator']} malloc{tuned}, {got['threads']} threads | {med:.1f} | "
                     f"{min(values):.0f}-{max(values):.0f} | {med / ref:.2f}x |")
    n = len(next(iter(rates.values())))
    return "\n".join([*lines, "", f"({n} steps per variant after warm-up, interleaved: `{shown}`)"])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(prog="python -m bench.ablate_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, metavar="NAME=SETTINGS",
                   help="a variant (at least two; the first is the reference)")
    p.add_argument("--steps", type=int, default=4, help="steps per variant per round (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=4, help="rounds (the first is warm-up)")
    p.add_argument("--readme", type=Path, help="also write the table between this file's "
                                               "<!-- ratios:ablation_cpu:begin/end --> markers")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.rounds < 2 or a.steps < 2 or len(a.variant) < 2:
        p.error("--rounds and --steps: at least 2 (the first of each is warm-up); --variant: at least two")
    try:
        variants = [parse_variant(v) for v in a.variant]
    except ValueError as exc:
        p.error(str(exc))
    if a.readme and "<!-- ratios:ablation_cpu:begin -->" not in a.readme.read_text():
        p.error(f"--readme {a.readme}: no <!-- ratios:ablation_cpu:begin/end --> markers to write between")
    rates, facts = run(variants, a.overrides, a.steps, a.rounds)
    shown = " ".join(["python -m bench.ablate_cpu", *(f"--variant '{v}'" for v in a.variant),
                      f"--steps {a.steps}", f"--rounds {a.rounds}", *a.overrides])
    text = table(rates, facts, shown)
    print(text)
    if a.readme:
        from analysis.ratios import replace_block

        a.readme.write_text(replace_block(a.readme.read_text(), text, "ablation_cpu"))


if __name__ == "__main__":
    main()
