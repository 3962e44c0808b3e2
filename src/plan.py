"""A trial's plan before it runs: peak memory and training speed predicted from the model's shape, the
quantization backend, the PEFT method's size and the batch shape, and whether the trial fits this machine.

``python -m src.plan <overrides>`` prints it for the trial ``python -m src.train <overrides>`` would run
(``-m`` and comma lists: every configuration of the grid). The sweepers' preflight uses the memory half
to refuse, before any work, the configurations that cannot fit (train.plan_memory).

The model is arithmetic, not a fit: bytes per weight of each backend, the tensors autograd keeps per
token and layer, the logits, and the process's own floor; the speed is the model FLOPs per token over
this machine's measured fp32 GEMM peak at the efficiency our loop reaches. Compared with the measured
scaling study in the README (``python -m analysis scaling``).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MB = 2**20
log = logging.getLogger(__name__)

# The worker's resident floor before the model: Python, torch, transformers, peft, the metrics, the
# tokenizer and the data (measured: a 6.6M-parameter synthetic trial peaked at 611 MB on 2 cores).
PROCESS_FLOOR_MB = 600
# Bytes per weight of the adapted base's linear layers, per backend and type (the embeddings, the
# untied head and the norms stay fp32 in every backend here). 4-bit types store two weights a byte
# plus one scale per block of 64: fp32 in bitsandbytes (8-bit with fp32 second-level scales when
# double-quantized), fp16 in ipex-llm. int8 keeps one scale per output row (negligible).
LINEAR_BYTES = {
    None: 4.0,
    "nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64,
    "int8": 1.0, "int8_weight_only": 1.0,
    "sym_int4": 0.5 + 2 / 64,
}
DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Backends whose first trial on a model converts it from fp32: ipex-llm's from_pretrained loads the whole
# model in fp32 and converts it afterwards (ggml_convert_low_bit). That runs once per model, in a child
# process that saves the low-bit copy the trials load (src/lowbit.py): it is not the trial's peak, but it
# must fit the same memory (the child inherits the worker's limit). bitsandbytes and torchao quantize
# each weight as the checkpoint is read.
CONVERTS_FROM_FP32 = ("ipex",)
# fp32 values autograd keeps per trained token in one decoder layer, in units of the layer's widths:
# the inputs of the adapted projections and their dropout copies, the normed states, q/k/v and the
# attention output for its backward, and the MLP's gate, up, activation and product.
ACT_PER_HIDDEN, ACT_PER_KV, ACT_PER_INTERMEDIATE = 9, 2, 4.5
# Copies of the (tokens x vocabulary) logits alive at the loss: the logits, log-softmax, its gradient.
LOGIT_COPIES = 3
# Share of the fp32 GEMM peak a trial's training reaches, counted in model FLOPs over every step. It
# depends on the CPU: the scaling studies' trials reached 38-48% on a 2-vCPU AMD EPYC (AVX2) and 44-74%
# on a 2-vCPU Intel Xeon (AVX-512, AMX), larger models higher. One value for both, fit to the two
# studies' 32 cells (tests/golden/scaling*.json), keeps every planned speed within 0.68-1.32x of the
# measured one. One value for every backend too: each trained within about 25% of fp32 at the same size.
LOOP_EFFICIENCY = 0.50
FLOPS_PER_PARAM = 4  # forward 2N, backward through the frozen weights 2N (bench.measure's convention)


@dataclass(frozen=True)
class Arch:
    """A Llama-like decoder's widths (what memory and speed depend on)."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer, by its module name."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embeddings, the head when untied, the norms: kept in fp32 by every backend."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def params(self) -> int:
        return self.linear_params() + self.other_params()


def arch_of(mcfg: Any, cache_dir: Path) -> Arch:
    """The architecture without loading weights or torch (the sweep's parent stays light): the shape of
    model=tiny/synthetic with the vocabulary of its tokenizer's GGUF file, the config.json of model=hf,
    the GGUF file's own metadata for model=gguf. Raises NotPlanned for a model the plan cannot read."""
    try:
        source = str(mcfg.source)
        if source in ("tiny", "synthetic"):
            s = mcfg.shape
            vocab = _gguf_facts(_gguf_file(mcfg), cache_dir)["vocab"]
            return Arch(int(s.hidden_size), int(s.num_layers), int(s.num_heads), int(s.num_kv_heads),
                        int(s.intermediate_size), int(vocab), bool(s.get("tie_embeddings", True)))
        if source == "gguf":
            return Arch(**_gguf_facts(_gguf_file(mcfg), cache_dir))
        return _arch_from_config_json(Path(mcfg.path) / "config.json")
    except Exception as exc:  # noqa: BLE001 - whatever the reason, the trial runs unplanned (refusal says so)
        raise NotPlanned(f"{mcfg.name}: its architecture cannot be planned ({type(exc).__name__}: {exc})") from exc


class NotPlanned(Exception):
    """The model's architecture cannot be read (not Llama-like, not local, unreadable)."""


def _gguf_file(mcfg: Any) -> Path:
    from src.paths import package_dir

    pkg = package_dir(mcfg.gguf_package)
    if pkg is None:
        raise FileNotFoundError(f"package {mcfg.gguf_package} is not installed")
    return pkg / mcfg.gguf_file


def _gguf_facts(gguf: Path, cache_dir: Path) -> dict[str, Any]:
    """A GGUF file's Llama widths and vocabulary, read from its metadata once (about 5 s: the reader
    indexes every tensor) and kept in the cache beside the converted models."""
    from src.results import atomic_write_json

    cached = cache_dir / "plans" / f"{gguf.stem}-{gguf.stat().st_size}.json"
    if cached.is_file():
        return dict(json.loads(cached.read_text()))
    from gguf import GGUFReader  # numpy only: no torch

    reader = GGUFReader(str(gguf))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")

    def field(key: str) -> int:
        f = reader.fields[f"{arch}.{key}"]
        return int(f.parts[f.data[0]][0])

    facts = {"hidden": field("embedding_length"), "layers": field("block_count"),
             "heads": field("attention.head_count"), "kv_heads": field("attention.head_count_kv"),
             "intermediate": field("feed_forward_length"), "vocab": len(reader.fields["tokenizer.ggml.tokens"].data),
             "tied": not any(t.name == "output.weight" for t in reader.tensors)}
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cached, facts)
    return facts


def _arch_from_config_json(path: Path) -> Arch:
    c = json.loads(path.read_text())
    heads = int(c["num_attention_heads"])
    return Arch(int(c["hidden_size"]), int(c["num_hidden_layers"]), heads, int(c.get("num_key_value_heads") or heads),
                int(c["intermediate_size"]), int(c["vocab_size"]), bool(c.get("tie_word_embeddings", False)))


def trainable_params(a: Arch, cfg: Any) -> int:
    """The LoRA family's adapter size (r x (in + out) per adapted projection); other PEFT methods are
    smaller than the activations by orders of magnitude and are counted as none."""
    if str(cfg.peft.method) not in ("lora", "dora", "rslora"):
        return 0
    shapes = a.linear_shapes()
    per_layer = sum(int(cfg.lora.r) * (shapes[m][0] + shapes[m][1]) for m in cfg.lora.target_modules if m in shapes)
    return a.layers * per_layer


def linear_bytes(q: Any) -> float:
    from src import quant

    kind = quant.resolved_type(q)
    if kind in ("nf4", "fp4") and bool(q.double_quant):
        return DOUBLE_QUANT_BYTES
    return LINEAR_BYTES[kind]


@dataclass
class Plan:
    model: str
    params_b: float
    backend: str
    tokens_per_step: int
    weights_mb: float
    adapter_mb: float
    activations_mb: float
    logits_mb: float
    floor_mb: float
    converting_mb: float  # the one-time conversion's peak, where the backend converts from fp32 (0: none)
    peak_rss_mb: float
    gflop_per_token: float
    tokens_per_s: float | None
    memory_mb: float
    fits: bool

    def line(self) -> str:
        speed = "" if self.tokens_per_s is None else f", ~{self.tokens_per_s:.0f} training tokens/s"
        verdict = "fits" if self.fits else "does NOT fit"
        return (f"{self.model} ({self.params_b:.2f}B parameters), {self.backend}, {self.tokens_per_step} tokens a "
                f"micro-batch: peak RSS ~{self.peak_rss_mb / 1024:.1f} GB (weights {self.weights_mb / 1024:.1f}, "
                f"activations {self.activations_mb / 1024:.1f}, logits {self.logits_mb / 1024:.1f}, process "
                f"{self.floor_mb / 1024:.1f}"
                + (f"; {self.converting_mb / 1024:.1f} once, converting from fp32 in its own process"
                   if self.converting_mb else "")
                + f"){speed}; {verdict} in {self.memory_mb / 1024:.1f} GB")


def memory_budget_mb(cfg: Any) -> float:
    """What a trial may use: train.memory_limit_mb when set (less the ~1.5 GB of address space that is not
    resident, see its comment), else the machine's physical memory."""
    from src import hw

    limit = cfg.train.get("memory_limit_mb")
    machine = hw.memory_mb()
    return min(float(limit) - 1536, machine) if limit else machine


def plan(cfg: Any, arch: Arch, gemm_gflops: float | None = None) -> Plan:
    """Predicted peak RSS and training tokens/s of the trial ``cfg`` on a model of architecture ``arch``;
    ``gemm_gflops``: this machine's fp32 GEMM peak (bench.gemm), or None for no speed prediction."""
    from src import quant

    t = cfg.train
    tokens = int(t.batch_size) * int(t.max_seq_len)  # the longest micro-batch there can be
    weights = arch.linear_params() * linear_bytes(cfg.quant) + arch.other_params() * 4
    method = str(cfg.quant.method) if quant.active(cfg.quant) else "none"
    # the converting child and the worker waiting for it (its tokenizer loaded), together
    converting = 2 * PROCESS_FLOOR_MB + (arch.params() * 4 + arch.linear_params() * linear_bytes(cfg.quant)) / MB \
        if method in CONVERTS_FROM_FP32 else 0.0
    adapter = trainable_params(arch, cfg) * 16  # fp32 weights, gradients and Adam's two moments
    per_layer = ACT_PER_HIDDEN * arch.hidden + ACT_PER_KV * arch.kv_dim + ACT_PER_INTERMEDIATE * arch.intermediate
    if t.gradient_checkpointing:  # each layer's input, and one layer's tensors while it is recomputed
        activations = tokens * 4 * (per_layer + arch.layers * arch.hidden)
    else:
        activations = tokens * 4 * per_layer * arch.layers
    logits = tokens * arch.vocab * 4 * LOGIT_COPIES
    peak = PROCESS_FLOOR_MB + (weights + adapter + activations + logits) / MB
    flops = FLOPS_PER_PARAM * (arch.linear_params() + arch.vocab * arch.hidden)  # the head's product too
    speed = None if gemm_gflops is None else gemm_gflops * 1e9 * LOOP_EFFICIENCY / flops
    budget = memory_budget_mb(cfg)
    backend = "fp32" if not quant.active(cfg.quant) else f"{cfg.quant.method} {quant.resolved_type(cfg.quant)}"
    return Plan(model=str(cfg.model.name), params_b=arch.params() / 1e9, backend=backend, tokens_per_step=tokens,
                weights_mb=weights / MB, adapter_mb=adapter / MB, activations_mb=activations / MB,
                logits_mb=logits / MB, floor_mb=PROCESS_FLOOR_MB, converting_mb=converting, peak_rss_mb=peak,
                gflop_per_token=flops / 1e9, tokens_per_s=speed, memory_mb=budget,
                fits=max(peak, converting) <= budget)


def refusal(cfg: Any) -> str | None:
    """Why the trial cannot fit this machine's memory, named with the keys to change; None when it fits
    (or train.plan_memory is off)."""
    if not cfg.train.get("plan_memory", True):
        return None
    try:
        p = plan(cfg, arch_of(cfg.model, Path(cfg.paths.cache_dir)))
    except NotPlanned as exc:  # the planner knows Llama-like decoders; any other model still runs
        log.warning("not planned: %s", exc)
        return None
    if p.fits:
        return None
    if p.peak_rss_mb <= p.memory_mb:  # the trial fits; only the one-time conversion from fp32 does not
        return (f"train.plan_memory: {p.backend} converts the model from fp32 once (in its own process, then "
                f"keeps the low-bit copy in the cache), which needs {p.converting_mb / 1024:.1f} GB, more than the "
                f"{p.memory_mb / 1024:.1f} GB it may use (the trial itself would peak at {p.peak_rss_mb / 1024:.1f} "
                "GB); quantize the base as it loads (quant=bnb_nf4), raise train.memory_limit_mb, or set "
                "train.plan_memory=false to run it anyway")
    fixes = [] if p.backend.startswith("bnb nf4") else ["quantize the base as it loads (quant=bnb_nf4)"]
    fixes += ["lower train.batch_size or train.max_seq_len"]
    if not cfg.train.gradient_checkpointing:
        fixes.append("set train.gradient_checkpointing=true")
    return (f"train.plan_memory: the planned peak RSS of this trial is {p.peak_rss_mb / 1024:.1f} GB "
            f"(weights {p.weights_mb / 1024:.1f} GB as {p.backend}, activations {p.activations_mb / 1024:.1f} GB), "
            f"more than the {p.memory_mb / 1024:.1f} GB it may use; {', '.join(fixes)}, or set "
            "train.plan_memory=false to run it anyway")


def expand(overrides: list[str]) -> list[list[str]]:
    """The configurations of a command line: one per combination of its comma lists and choices, as the
    grid sweeper runs them (an interval is refused: it has no finite list of values to plan)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from src.sweeper import space

    grid = space.build(OverridesParser.create().parse_overrides(overrides))
    return [grid.overrides(params) for params in grid.jobs()]


def main(argv: list[str]) -> int:
    import argparse

    from src import hw
    from src.config import compose

    p = argparse.ArgumentParser(prog="python -m src.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="the plans as JSON, one object per configuration")
    p.add_argument("--no-speed", action="store_true", help="memory only (skips the 2-second GEMM measurement)")
    p.add_argument("overrides", nargs="*", help="as for python -m src.train (comma lists: every combination)")
    args = p.parse_args([a for a in argv if a not in ("-m", "--multirun")])
    gemm = None if args.no_speed else float(hw.gemm_peak(hw.usable_cores())["gflops_peak"])
    rows = []
    for overrides in expand(args.overrides):
        cfg = compose(overrides)
        rows.append(plan(cfg, arch_of(cfg.model, Path(cfg.paths.cache_dir)), gemm))
    if args.json:
        print(json.dumps([{**asdict(r), "gemm_gflops": gemm} for r in rows], indent=1))
    else:
        if gemm is not None:
            print(f"fp32 GEMM peak of this machine: {gemm:.0f} GFLOP/s; speeds assume {LOOP_EFFICIENCY:.0%} of it")
        for r in rows:
            print(r.line())
    return 0 if all(r.fits for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
