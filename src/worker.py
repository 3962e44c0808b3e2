"""Entry of the fresh trial process: ``python -m src.worker <trial_dir>``.

The parent (src.train) has already set threads and allocator in this process's environment, so
they apply before torch loads. Reads ``trial_config.json``, runs seed -> data -> model -> baseline
-> LoRA -> train -> evaluate -> cost, and always leaves a result.json: completed, or failed with
the error. Exit code 0 when completed, 1 when failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src import cost as C
from src import metrics as M
from src import redact, results
from src.results import TrialResult

ADAPTER_DIR = "adapter"
WARM_WORKER_ENV = "PARETUNE_WARM_WORKER"  # set in a child of a warm worker (src/warm.py): the warm worker's pid

log = logging.getLogger("paretune.worker")


@dataclass
class Trial:
    """What the worker has learnt so far; written as the record whether the trial ends well or not."""
    cfg: DictConfig
    trial_dir: Path
    started: float = field(default_factory=time.perf_counter)
    metrics: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    gains: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, list[float]] = field(default_factory=dict)  # bootstrap 95% of metrics and gains
    baseline_rows: list[dict[str, Any]] = field(default_factory=list)  # the untuned model's per-example values
    timings: dict[str, float] = field(default_factory=dict)
    cost_info: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)       # the splits: sizes, truncated, dropped
    run: dict[str, Any] = field(default_factory=dict)        # model facts, baseline source, quant, how it stopped
    cpu: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    peaks: C.PhasePeaks = field(default_factory=C.PhasePeaks)  # created with the trial: its first phase starts

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Time a stage into ``timings[<stage>_s]`` (also when it fails: the record shows how far it got)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[f"{stage}_s"] = time.perf_counter() - t0

    def record(self, status: str, error: dict[str, str] | None = None) -> TrialResult:
        plain: dict[str, Any] = OmegaConf.to_container(self.cfg, resolve=True)  # type: ignore[assignment]
        trial_info = dict(plain.pop("trial", {}))
        trial_info["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        environment = trial_info.pop("environment", {})
        environment["packages"] = _versions()
        metrics, baseline, gains = self.metrics, self.baseline, self.gains
        objectives = {}
        if status == "completed":
            objectives = {o["name"]: metrics[o["name"]] for o in plain["objectives"]}
        else:  # keep what was measured before the failure, never a non-number
            metrics, baseline, gains = (_finite(d) for d in (metrics, baseline, gains))
        return TrialResult(
            status=status, trial=trial_info, config=plain, metrics=metrics, baseline=baseline,
            gains=gains, intervals=self.intervals, objectives=objectives, error=error, timings=self.timings,
            cost_info=self.cost_info, data=self.data, run=self.run, cpu=self.cpu, environment=environment,
            artifacts=self.artifacts, seed=plain["train"]["seed"])


def _finite(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if math.isfinite(v)}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "accelerate", "hydra-core", "omegaconf", "optuna", "wandb",
                "rouge-score", "bert-score", "numpy", "tokenizers", "safetensors", "bitsandbytes", "torchao",
                "ipex-llm", "paretune"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _precision(dtype: str) -> Any:
    """bf16 autocast for matmuls (weights and LoRA stay fp32), or nothing for fp32."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def _autocast_state() -> str | None:
    import torch

    return str(torch.get_autocast_dtype("cpu")).removeprefix("torch.") if torch.is_autocast_enabled("cpu") else None


def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _quantized_base(cfg: DictConfig, cache_dir: Path, tdir: Path) -> Any:
    """The base model loaded straight into the quantization backend (src/quant.py says how each does it)."""
    import shutil

    from src import model, quant

    scratch, scratch_low_bit = tdir / ".base", tdir / ".base-low-bit"
    try:
        folder = model.base_folder(cfg.model, cache_dir, cfg.train.seed, scratch)
        # a model built for this trial alone (the tiny one) gets its low-bit copy beside it, not in the cache
        low_bit_root = scratch_low_bit if Path(folder) == scratch else cache_dir / "low-bit"
        return quant.load(folder, cfg.quant, low_bit_root)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(scratch_low_bit, ignore_errors=True)


@dataclass
class Inputs:
    """What every stage after loading works on: the tokenizer and the examples, as the model sees them."""
    tok: Any
    builder: Any
    train_examples: list[Any]
    eval_examples: list[Any]

    @property
    def pad_id(self) -> int:
        return int(self.tok.pad_token_id)


def run(t: Trial) -> str:
    """The trial's stages in order; each one outside training and evaluation is timed, and together
    they are the sweep's overhead. Returns the trial's status: completed, or pruned (by the study's
    pruner, during training)."""
    t.run["process"] = _process()
    log.info("worker pid %d (%s)", os.getpid(), t.run["process"]["start"]
             + (f" {t.run['process']['warm_worker_pid']}" if t.run["process"]["warm_worker_pid"] else ""))
    with t.timed("import"):  # torch, transformers, peft and the metrics, through the stages' modules
        from src import baseline, cost, cpu, data, evaluate, interference, loop, model, quant  # noqa: F401
    with t.timed("cpu_probe"):
        _apply_cpu(t)
    _seed(t.cfg.train.seed)
    net, inputs = _load(t)
    t.peaks.end("load")  # a checkpoint's mapped pages count here, until the loader closes its files
    synthetic = str(t.cfg.model.source) == "synthetic"
    if not synthetic:  # random weights have no quality to compare against
        _untuned_baseline(t, net, inputs)
        t.peaks.end("baseline")
    meter = cost.EnergyMeter.start()  # the trial's own cost starts here: the baseline is shared
    _seed(t.cfg.train.seed)
    with t.timed("setup"):  # attaching the adapter
        net = _trainable(t, net, inputs)
    with interference.Sampler() as sampler:  # its first and last snapshots enclose training
        stats = _train(t, net, inputs)
    t.peaks.end("train")  # attaching the adapter and training
    if stats.stopped_by == "pruned":  # the study's pruner stopped it: what it cost so far, no evaluation
        _account(t, stats, {}, 0.0, meter)
        return "pruned"
    with t.timed("save"):
        net.save_pretrained(t.trial_dir / ADAPTER_DIR)
        t.artifacts["adapter"] = ADAPTER_DIR
    if synthetic:  # its summaries would be noise: speed and memory are what it measures
        t.run["eval_model"] = f"not evaluated ({model.SYNTHETIC_NOTE})"
        t.cost_info["interference"] = _interference(stats, sampler.samples)
        t.peaks.end("eval")  # saving the adapter
        _account(t, stats, {}, 0.0, meter)
        return "completed"
    before_eval = interference.snapshot()
    scores, eval_s = _evaluate(t, net, inputs)
    after_eval = interference.snapshot()
    t.peaks.end("eval")  # saving the adapter, merging it and evaluating
    t.cost_info["interference"] = _interference(stats, sampler.samples, before_eval, after_eval)
    _account(t, stats, scores, eval_s, meter)
    return "completed"


def _process() -> dict[str, Any]:
    """How this process started: fresh, or forked from a warm worker (src/warm.py; imports already done)."""
    server = os.environ.get(WARM_WORKER_ENV)
    return {"pid": os.getpid(), "start": "forked from warm worker" if server else "fresh",
            "warm_worker_pid": int(server) if server else None}


def set_threads(cpu_cfg: Any) -> None:
    """torch's thread pools, from PARETUNE_THREADS (set by the parent from cfg.cpu; a worker started by
    hand uses every usable core)."""
    import torch

    from src import hw

    torch.set_num_threads(int(os.environ.get("PARETUNE_THREADS") or hw.usable_cores()))
    torch.set_num_interop_threads(int(cpu_cfg.interop_threads))  # once per process, before parallel work


def _apply_cpu(t: Trial) -> None:
    from src import cpu

    set_threads(t.cfg.cpu)
    t.cpu = cpu.in_effect(t.cfg.cpu)


def _load(t: Trial) -> tuple[Any, Inputs]:
    from src import data, model, quant

    cfg = t.cfg
    cache_dir = Path(cfg.paths.cache_dir)
    with t.timed("prepare"):  # converts or writes the model into the cache the first time only
        model.prepare(cfg.model, cache_dir)
    with t.timed("load"):
        if quant.active(cfg.quant):  # loaded into the backend: never an fp32 model first, then its twin
            tok = model.load_tokenizer(cfg.model, cache_dir)
            net = _quantized_base(cfg, cache_dir, t.trial_dir)
            t.run["model"] = model.facts(cfg.model, tok, net)
            t.run["quant"] = quant.describe(cfg.quant, net)
        else:
            tok, net, t.run["model"] = model.load(cfg.model, cache_dir, cfg.train.seed)
            t.run["quant"] = {"backend": "none", "bits": 32}
    with t.timed("data"):
        builder = data.PromptBuilder(tok, cfg.data.instruction, cfg.train.max_seq_len, str(cfg.data.truncation))
        train_ex, eval_ex, t.data["splits"] = data.load_splits(cfg.data, builder, cfg.eval.num_examples,
                                                               cfg.train.seed)
    return net, Inputs(tok, builder, train_ex, eval_ex)


def _score(t: Trial, net: Any, inputs: Inputs, timings: dict[str, float] | None = None,
           ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from src import evaluate

    cfg = t.cfg
    return evaluate.evaluate(net, inputs.tok, inputs.eval_examples, cfg.eval, inputs.pad_id, inputs.builder.eos_id,
                             cfg.train.batch_size, timings)


def _untuned_baseline(t: Trial, net: Any, inputs: Inputs) -> None:
    from src import baseline, data, evaluate

    cfg = t.cfg
    def compute() -> tuple[dict[str, float], list[dict[str, Any]]]:
        scores, rows = _score(t, net, inputs)
        return scores, evaluate.per_example(rows)

    t.baseline, info = baseline.get_or_compute(Path(cfg.paths.cache_dir), cfg, data.split_paths(cfg.data)["eval"],
                                               compute)
    t.timings["baseline_s"] = info["seconds"]
    t.run["baseline"] = {"cached": info["cached"], "key": info["key"], "precision": info["precision"]}
    t.baseline_rows = info["per_example"]


def _trainable(t: Trial, net: Any, inputs: Inputs) -> Any:
    """The model training starts from: the base (loaded quantized when asked) with the PEFT method attached."""
    from src import adapters, loop

    cfg = t.cfg
    net = adapters.attach(net, cfg, loop.total_steps(cfg.train, len(inputs.train_examples)))
    t.run["peft"] = adapters.describe(net, cfg)
    t.run["trainable_params"] = t.run["peft"]["trainable_params"]
    return net


def _train(t: Trial, net: Any, inputs: Inputs) -> Any:
    signal = _signal(t, net, inputs)
    fused = _fuse(t, net, inputs)
    try:
        return _train_loop(t, net, inputs, signal)
    finally:
        if fused is not None:
            # groups whose input turned out not to be shared ran peft's forward from then on
            t.run["fused_projections"]["fell_back"] = sum(g.broken for g in fused.groups)
            fused.remove()  # evaluation runs peft's own layers, as deployed


def _train_loop(t: Trial, net: Any, inputs: Inputs, signal: Any) -> Any:
    from src import loop

    cfg = t.cfg
    with open(t.trial_dir / results.TRAIN_LOG, "w") as train_log, _profiling(t) as profiled:
        def on_step(step: int) -> bool:
            stop = False
            if signal is not None:
                # (paused only where it reports: each toggle of the profiler logs a warning)
                with profiled.paused() if profiled is not None and signal.reports(step) else contextlib.nullcontext():
                    stop = bool(signal(step))
            if profiled is not None:
                profiled.step()
            return stop

        hook = on_step if profiled is not None or signal is not None else None

        def on_log(row: dict[str, float]) -> None:
            train_log.write(json.dumps(row) + "\n")
            train_log.flush()

        with _precision(cfg.cpu.dtype):
            t.cpu["autocast_in_training"] = _autocast_state()  # read inside the context the loop runs in
            if str(cfg.train.engine) == "hf_trainer":
                from src import hf_engine

                stats = hf_engine.train(net, inputs.tok, inputs.train_examples, cfg.train,
                                        t.trial_dir / ".hf_trainer", on_log, hook)
            else:
                stats = loop.train(net, inputs.train_examples, cfg.train, inputs.pad_id, on_log, hook)
        if profiled is not None:
            profiled.done = stats.steps  # a step the time budget ended was trained, though not hooked
    t.artifacts["train_log"] = results.TRAIN_LOG
    t.run["stopped_by"] = stats.stopped_by
    return stats


def _signal(t: Trial, net: Any, inputs: Inputs) -> Any:
    """When the sweep prunes (``trial.reports_signal``, set by the parent): every ``eval.signal_every``
    steps and at the last step (a trial pruned there skips its whole evaluation), from the step the
    relay's last answer says the pruner reads next on, the eval loss on the ``eval.signal_examples``
    shortest eval examples goes to signal.jsonl, which the parent relays to the study (src/relay.py);
    the worker then waits for the parent's answer. Returns True, ending training
    at the reported step, when the study's pruner stopped the trial. None when the sweep does not prune."""
    if not t.cfg.trial.get("reports_signal"):
        return None
    from src import evaluate, loop

    cfg = t.cfg
    every, last = int(cfg.eval.signal_every), loop.total_steps(cfg.train, len(inputs.train_examples))
    # The shortest examples, so that a report costs little (its passes are over few, short sequences,
    # batched by length: measured 2.0 s against 5.3 s for the first 8 on SmolLM2-135M, AMD EPYC 2 vCPU);
    # fixed, so every trial of a study is judged on the same ones.
    subset = sorted(inputs.eval_examples, key=lambda ex: len(ex.input_ids))[:int(cfg.eval.signal_examples)]
    trial_dir = t.trial_dir
    signal_path, prune_path = trial_dir / results.SIGNAL_FILE, trial_dir / results.PRUNE_FILE
    t.timings["signal_s"] = 0.0
    t.artifacts["signal"] = results.SIGNAL_FILE
    patience = DECISION_WAIT_S  # after one unanswered report, the next are not waited for until answered
    # The first step at which a report can change anything (the relay's answers say; None: every cadence
    # step). Successive halving reads only its rungs: a report between two is a second or more for nothing.
    decided_path = trial_dir / results.DECIDED_FILE
    first, _ = results.load(decided_path)
    due: int | None = (first or {}).get("next")
    pending: int | None = None  # a report whose answer did not come in time: a late one still says what is due

    def stop_at(step: int) -> bool:
        decided, _ = results.load(prune_path)
        t.run["pruned"] = {**(decided or {}), "stopped_after_step": step}
        return True

    def reports(step: int) -> bool:
        return (step % every == 0 or step == last) and (due is None or step >= due)

    def on_step(step: int) -> bool:
        nonlocal patience, due, pending
        if prune_path.exists():  # an answer that came after its wait ran out
            return stop_at(step)
        if pending is not None and (late := _answer_to(decided_path, pending)) is not None:
            if late.get("prune"):  # prune.json landed just after the check above
                return stop_at(step)
            # the parent answers again: the next reports are waited for, so a prune costs no extra step
            due, pending, patience = late.get("next"), None, DECISION_WAIT_S
        if not reports(step):
            return False
        t0 = time.perf_counter()
        net.eval()  # no dropout: the same examples give comparable values across steps and trials
        value = evaluate.eval_loss(net, subset, int(cfg.train.batch_size), inputs.pad_id)
        net.train()
        with open(signal_path, "a") as fh:
            fh.write(json.dumps({"step": step, "value": value}) + "\n")
        answer = _await_decision(decided_path, step, patience, prune_path)
        patience = DECISION_WAIT_S if answer is not None else 0.0
        # unanswered: every cadence step is due until an answer (to this report or a later one) comes
        due, pending = (answer.get("next"), None) if answer is not None else (None, step)
        t.timings["signal_s"] += time.perf_counter() - t0  # the wait for the answer is the signal's cost too
        return stop_at(step) if answer is not None and answer.get("prune") else False

    on_step.reports = reports  # type: ignore[attr-defined]  # the profiler leaves these steps' reports out
    return on_step


DECISION_WAIT_S = 10.0  # a report the parent cannot answer by then (its database unreachable) is not waited
                        # for: training goes on, and a late prune.json still stops it at a later step


def _await_decision(decided: Path, step: int, wait_s: float = DECISION_WAIT_S,
                    pruned: Path | None = None) -> dict[str, Any] | None:
    """The parent's answer to the report of ``step`` (src/relay.py: ``{"step", "prune", "next"}``), or None when
    it did not come in ``wait_s``. A ``pruned`` file (the study stopped the trial at an earlier report
    whose answer came late) is an answer too: stop."""
    deadline = time.monotonic() + wait_s
    while True:
        if pruned is not None and pruned.exists():
            return {"step": step, "prune": True}
        if (answer := _answer_to(decided, step)) is not None:
            return answer
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def _answer_to(decided: Path, step: int) -> dict[str, Any] | None:
    """The parent's answer in ``decided`` if it is to the report of ``step`` or a later one (the relay keeps
    only its latest answer there), else None."""
    answer, _ = results.load(decided)  # written atomically: whole or absent
    return answer if answer is not None and int(answer.get("step", -1)) >= step else None


PROFILE_WARMUP_STEPS = 2  # as bench.measure: the first steps pay for allocations and MKL's kernel choice


class _Profiled:
    """The trial's profiler as the training hook sees it: ``step()`` after each training step,
    ``paused()`` around work that is not training (the pruning signal), ``done``: steps trained."""

    def __init__(self, prof: Any) -> None:
        self.prof, self.done = prof, 0

    def step(self) -> None:
        self.done += 1
        self.prof.step()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        from torch.profiler import ProfilerActivity

        self.prof.toggle_collection_dynamic(False, [ProfilerActivity.CPU])
        try:
            yield
        finally:
            self.prof.toggle_collection_dynamic(True, [ProfilerActivity.CPU])


@contextlib.contextmanager
def _profiling(t: Trial) -> Iterator[_Profiled | None]:
    """train.profile_steps > 0: torch.profiler over that many steps after the warm-up ones, inside the
    trial's own process (threads, allocator and all, which an in-process benchmark does not have); the
    operators by self CPU time go to profile.txt. Yields the profiler's handle for the training hook, or
    None. The profiled steps run slower; ``run.profiled_steps`` says which they were."""
    steps = int(t.cfg.train.profile_steps)
    if steps <= 0:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    handle: _Profiled | None = None

    def write(prof: Any) -> None:
        assert handle is not None
        first, last = PROFILE_WARMUP_STEPS + 1, min(PROFILE_WARMUP_STEPS + steps, handle.done)
        if last < first:  # training ended before the window
            return
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (t.trial_dir / results.PROFILE_FILE).write_text(
            f"torch.profiler, training steps {first}-{last} of this trial (the pruning signal left out), "
            f"sorted by self CPU time\n{table}\n")
        t.artifacts["profile"] = results.PROFILE_FILE
        t.run["profiled_steps"] = [first, last]

    # the step before the window is the profiler's own warm-up (its start-up would skew the first one)
    with profile(activities=[ProfilerActivity.CPU], on_trace_ready=write,
                 schedule=schedule(wait=PROFILE_WARMUP_STEPS - 1, warmup=1, active=steps, repeat=1)) as prof:
        handle = _Profiled(prof)
        yield handle


def _fuse(t: Trial, net: Any, inputs: Inputs) -> Any:
    """train.fuse_projections: the adapted layers that share an input, found on a short probe from
    the first training example, computed as one product each (src/fuse.py). Our loop only: the
    Trainer engine is the reference it is compared with, and runs peft's layers as anywhere else."""
    if not t.cfg.train.fuse_projections or str(t.cfg.train.engine) != "loop":
        return None
    from src import fuse

    fused = fuse.apply_on(net, inputs.train_examples[0].input_ids)
    t.run["fused_projections"] = {"groups": len(fused.groups), "layers": fused.layers}
    return fused


def _evaluate(t: Trial, net: Any, inputs: Inputs) -> tuple[dict[str, float], float]:
    """Scores of the model as it would be deployed: the adapter merged into (or kept beside) the base;
    each example's own scores beside the record, and the metrics' and gains' bootstrap intervals."""
    from src import adapters, evaluate, quant, uncertainty

    cfg = t.cfg
    t0 = time.perf_counter()
    refusal = adapters.merge_refusal(cfg)
    merge = bool(cfg.eval.merge_adapter) and refusal is None
    if merge:
        net = net.merge_and_unload()
    base = "fp32 base" if not quant.active(cfg.quant) else f"{t.run['quant']['quant_type']} base"
    t.run["eval_model"] = ("merged into " if merge else "adapter on ") + base
    if cfg.eval.merge_adapter and refusal is not None:
        t.run["eval_model"] += f" ({refusal})"
    with _precision(cfg.cpu.dtype):  # evaluated in the precision it was trained and would be served in
        t.run["eval_decoder"] = evaluate.decoder_for(net, str(cfg.eval.decoder))  # autocast decides too
        scores, rows = _score(t, net, inputs, t.timings)
    eval_s = time.perf_counter() - t0
    if any("prediction" in row for row in rows):
        results.write_jsonl(t.trial_dir / results.PREDICTIONS, rows)
        t.artifacts["predictions"] = results.PREDICTIONS
    numbers = evaluate.per_example(rows)
    results.write_jsonl(t.trial_dir / results.PER_EXAMPLE, numbers)
    t.artifacts["per_example"] = results.PER_EXAMPLE
    if t.baseline_rows:
        results.write_jsonl(t.trial_dir / results.BASELINE_PER_EXAMPLE, t.baseline_rows)
        t.artifacts["baseline_per_example"] = results.BASELINE_PER_EXAMPLE
    t.intervals = uncertainty.record_intervals(numbers, t.baseline_rows, seed=int(cfg.train.seed))
    return scores, eval_s


def _interference(stats: Any, train_samples: list[Any], *eval_snaps: Any) -> dict[str, Any]:
    """Other processes' share of the machine while this trial trained and evaluated, each stage and
    both together (seconds-weighted); ``busy`` flags costs measured while the machine was shared.
    Training also gets each step's share and which steps were quiet (what cost/train_s_robust uses).
    Without ``eval_snaps`` (a trial that is not evaluated), training only."""
    from src import interference

    train = interference.between(train_samples[0], train_samples[-1])
    shares = interference.step_shares(train_samples, stats.step_end, stats.step_s)
    train["step_others_share"] = [None if x is None else round(x, 4) for x in shares]
    train["quiet_steps"] = sum(interference.quiet_steps(shares))
    if not eval_snaps:
        return {"train": train, **{k: train[k] for k in ("others_cpu_share", "steal_share", "busy") if k in train}}
    evaluation = interference.between(*eval_snaps)
    out: dict[str, Any] = {"train": train, "eval": evaluation}
    if train["others_cpu_share"] is not None and evaluation["others_cpu_share"] is not None:
        wall = train["wall_s"] + evaluation["wall_s"]
        for key in ("others_cpu_share", "steal_share"):
            out[key] = (train[key] * train["wall_s"] + evaluation[key] * evaluation["wall_s"]) / wall
        out["busy"] = bool(train["busy"] or evaluation["busy"])
    return out


def _account(t: Trial, stats: Any, scores: dict[str, float], eval_s: float, meter: Any) -> None:
    """The trial's metrics and what it cost."""
    from src import baseline, cost, interference

    # Worker wall time without the shared baseline: process start, load, train, eval, saving.
    total_s = time.perf_counter() - t.started - t.timings.get("baseline_s", 0.0)
    money, priced = cost.price(total_s, meter.stop_wh(), t.cfg.cost)
    shares = t.cost_info.get("interference", {}).get("train", {}).get("step_others_share")
    quiet = interference.quiet_steps(shares) if shares is not None else None
    t.cost_info.update(priced)  # beside the interference measured during training and evaluation
    t.metrics = {
        M.TRAIN_LOSS: stats.final_loss, M.TRAIN_TOKENS_PER_S: stats.tokens_per_s,
        M.TRAIN_STEPS: float(stats.steps), M.TRAIN_TOKENS: float(stats.tokens),
        M.TRAIN_PARAMS: float(t.run["peft"]["trainable_params"]),
        **scores,
        M.COST_TRAIN_S: stats.train_s, M.COST_EVAL_S: eval_s, M.COST_TOTAL_S: total_s,
        M.COST_TRAIN_S_ROBUST: interference.robust_train_s(stats.step_s, stats.step_tokens, quiet) or stats.train_s,
        M.COST_PEAK_RSS_MB: t.peaks.peak_mb(), M.COST_ADAPTER_MB: cost.dir_size_mb(t.trial_dir / ADAPTER_DIR),
        **money,
    }
    t.cost_info["peak_rss_mb_by_phase"] = t.peaks.describe()
    if t.peaks.per_phase:
        t.metrics[M.COST_TRAIN_PEAK_RSS_MB] = t.peaks.phases["train"]
    elif any(o.name == M.COST_TRAIN_PEAK_RSS_MB for o in t.cfg.objectives):
        raise RuntimeError(f"{M.COST_TRAIN_PEAK_RSS_MB}: this kernel stopped letting the worker reset its peak RSS "
                           f"(/proc/self/clear_refs) during the trial; use {M.COST_PEAK_RSS_MB} as the objective")
    share = t.cost_info.get("interference", {}).get("others_cpu_share")
    if share is not None:
        t.metrics[M.COST_OTHERS_CPU_SHARE] = share
    t.gains = baseline.gains(t.metrics, t.baseline)
    t.timings.update(train_s=stats.train_s, eval_s=eval_s, total_s=total_s,
                     worker_wall_s=time.perf_counter() - t.started)


# How torch and the allocators report an allocation that failed.
_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "std::bad_alloc", "out of memory")


def _describe(exc: BaseException, cfg: DictConfig) -> str:
    """The failure in words; running out of memory says so, with the limit that was hit."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError) or any(m in message.lower() for m in _OOM_MARKERS):
        limit = cfg.train.get("memory_limit_mb")
        where = f"the train.memory_limit_mb={limit} limit" if limit else "the machine's memory"
        return (f"out of memory: the trial needed more than {where}; lower train.batch_size or "
                f"train.max_seq_len, set train.gradient_checkpointing=true, or raise the limit ({message})")
    return message


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m src.worker <trial_dir>", file=sys.stderr)
        return 2
    tdir = Path(argv[1]).resolve()
    redact.guard_process(argv)  # the storage URL reaches the worker only through the environment
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[worker %(asctime)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")
    t = Trial(OmegaConf.create(results.read_config(tdir)), tdir)
    try:
        result = t.record(run(t))
    except BaseException as exc:  # noqa: BLE001 - every failure must end up in the record
        message = _describe(exc, t.cfg)
        log.error("trial failed: %s: %s", type(exc).__name__, message)
        t.timings["worker_wall_s"] = time.perf_counter() - t.started
        # how far memory got, by phase ("failed": since the last phase that ended), for reading an
        # out-of-memory failure; kept out of the metrics, which a failed trial does not have
        with contextlib.suppress(Exception):  # the record comes first, whatever happens here
            t.peaks.end("failed")
            t.cost_info["peak_rss_mb_by_phase"] = {**t.peaks.describe(), "whole": t.peaks.peak_mb()}
        result = t.record("failed", {"type": type(exc).__name__, "message": message,
                                     "traceback": traceback.format_exc()})
    results.write(tdir, result)
    return 0 if result.status == "completed" else 1


def cli(argv: list[str]) -> None:
    """Run the trial, then leave the process at once (also the entry of a child of a warm worker)."""
    code = main(argv)
    # Everything is written (result.json atomically, the logs closed): skip the interpreter's teardown,
    # which takes about 1.7 s after torch and transformers are loaded (measured on 2 cores) and would
    # be paid by every trial of a sweep.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli(sys.argv)
