"""``python -m bench``: our training loop against transformers.Trainer on the same trial, and how close
both run to this machine's matmul peak.

    python -m bench [--pairs 5] [--readme README.md [--block speed]] [--out FILE] [OVERRIDE ...]
    python -m bench --from SWEEP_DIR [--readme README.md]      # summarise a benchmark sweep again

It measures the fp32 GEMM peak in three fresh processes, then runs one sweep over ``train.engine=loop,
hf_trainer`` with ``train.seed=1..pairs`` first, so the two engines alternate (A B A B ...) in one
process tree, each trial in its own fresh worker as always. OVERRIDEs (e.g. ``cpu.threads=1``,
``model=hf model.path=...``) apply to every trial. The JSON (machine, GEMM peak, every trial's numbers,
medians, ratios, targets) goes to --out and into the sweep folder; then three more GEMM processes run,
and the best of the six is the peak. --readme writes the table between the
``<!-- ratios:BLOCK:begin/end -->`` markers (--block). The sweep is only as fair as the machine is quiet:
run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import check_readme_block, measure
from src import cpu, hw, results
from src.config import compose
from src.paths import PROJECT_ROOT

ENGINES = ("loop", "hf_trainer")
GEMM_FILE, SWEEP_FILE, RESULT_FILE = "bench_gemm.json", "bench_sweep.json", "bench.json"


GEMM_PROCESSES, GEMM_REPS = 3, 40


def gemm(threads: int, processes: int = GEMM_PROCESSES, reps: int = GEMM_REPS) -> list[dict[str, Any]]:
    """The GEMM peak measured in ``processes`` fresh processes, one after the other. On a shared VM one
    process's best product ranged from 242 to 350 GFLOP/s within half an hour (a neighbour's burst can
    outlast a whole process), so no single process sets the peak."""
    runs = []
    for _ in range(processes):
        out = subprocess.run([sys.executable, "-m", "bench.gemm", "--threads", str(threads), "--reps", str(reps)],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def gemm_summary(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """The best process's peak, either side of the sweep: MFU is never flattered by a peak measured while
    the machine happened to be slow. The spread of the processes' peaks says how steady it was."""
    peaks = [g["gflops_peak"] for g in before + after]
    return {**max(before + after, key=lambda g: g["gflops_peak"]), "processes": len(peaks),
            "gflops_peak_min": min(peaks), "before": before, "after": after}


def _study_name(sweep_dir: Path) -> str:
    return sweep_dir.name if sweep_dir.name.startswith("bench") else f"bench-{sweep_dir.name}"


def sweep_command(sweep_dir: Path, pairs: int, overrides: list[str]) -> list[str]:
    # Seeds first: the grid runs in command-line order, so each seed's two engines run back to back.
    seeds = ",".join(str(s) for s in range(1, pairs + 1))
    return [sys.executable, "-m", "src.train", "-m", f"hydra.sweep.dir={sweep_dir}",
            f"hydra.sweeper.study_name={_study_name(sweep_dir)}", "hydra.sweeper.max_failure_rate=1",
            f"train.seed={seeds}", f"train.engine={','.join(ENGINES)}", *overrides]


def run_sweep(sweep_dir: Path, pairs: int, overrides: list[str], invocation: str) -> dict[str, Any]:
    cmd = sweep_command(sweep_dir, pairs, overrides)
    print("+", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT)
    info = {"invocation": invocation, "command": ["python", *cmd[1:]], "wall_s": time.perf_counter() - start,
            "returncode": proc.returncode}
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=2))
    return info


def collect(sweep_dir: Path, gemm_gflops: float, sweep_wall_s: float) -> dict[str, Any]:
    """Every trial of the sweep, its numbers, and the per-engine summary."""
    dirs = sorted((p.parent for p in results.record_files(sweep_dir)), key=lambda p: int(p.name))
    if not dirs:
        raise SystemExit(f"{sweep_dir}: no trial records; did the sweep start?")
    records = [(d, results.read(d).to_dict()) for d in dirs]
    in_workers = sum(float(r["timings"].get("trial_wall_s", r["timings"].get("worker_wall_s", 0.0)))
                     for _, r in records)
    gap_s = max(0.0, sweep_wall_s - in_workers) / len(records)
    trials: list[dict[str, Any]] = []
    per_engine: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    for d, r in records:
        engine = r["config"]["train"]["engine"]
        row: dict[str, Any] = {"dir": d.name, "engine": engine, "seed": r["seed"], "status": r["status"]}
        if r["status"] == "completed":
            row.update(measure.trial_numbers(r, d, gemm_gflops, gap_s))
            per_engine[engine].append(row)
        else:
            row["error"] = (r.get("error") or {}).get("message")
        trials.append(row)
    missing = [e for e, rows in per_engine.items() if not rows]
    if missing:
        raise SystemExit(f"no completed trial for engine(s) {missing}; see the records in {sweep_dir}")
    numbers = {e: [{k: v for k, v in row.items() if isinstance(v, float)} for row in rows]
               for e, rows in per_engine.items()}
    first = records[0][1]
    train, model = first["config"]["train"], first["run"]["model"]
    shape = {"model": model["name"], "n_params": model["n_params"],
             "trainable_params": first["run"].get("trainable_params"),
             "batch_size": train["batch_size"], "max_seq_len": train["max_seq_len"], "max_steps": train["max_steps"],
             "adapter": _adapter(first), "quant": first["run"].get("quant", {}).get("backend"),
             "dtype": first["config"]["cpu"]["dtype"], "threads": first["cpu"].get("torch_threads"),
             "allocator": first["cpu"].get("allocator")}
    return {"trials": trials, "summary": measure.summarize(numbers), "gap_s_per_trial": gap_s, "trial_shape": shape}


def _adapter(record: dict[str, Any]) -> str:
    """The PEFT method a trial trained, for the table: "LoRA r=16", "DoRA r=16", "ia3"..."""
    peft = record["run"].get("peft") or {"method": "lora", "settings": record["config"].get("lora") or {}}
    names = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA"}
    rank = (peft.get("settings") or {}).get("r")
    return names.get(peft["method"], peft["method"]) + (f" r={rank}" if rank is not None else "")


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return {"pct": f"{100 * value:.1f}%", "x": f"{value:.2f}x", "n": f"{value:.4g}"}[kind]


def table(report: dict[str, Any]) -> str:
    """The README block: machine, trial shape, per-engine medians (range), the ratios and the targets."""
    m, s, shape = report["machine"], report["summary"], report["trial_shape"]
    rows = [("training tokens/s (real tokens, median step after warm-up)", "train_tokens_per_s", "n"),
            ("MFU (4 x params x tokens/s / GEMM peak)", "mfu", "pct"),
            ("peak RSS, MB", "peak_rss_mb", "n"),
            ("eval generation tokens/s", "eval_gen_tokens_per_s", "n"),
            ("eval generation, share of trial wall", "eval_gen_fraction", "pct"),
            ("sweep overhead, share of trial wall", "overhead_fraction", "pct"),
            ("trial wall, s", "trial_wall_s", "n")]
    e = s["engines"]
    isa = ", ".join(f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if m["flags"].get(f))
    lines = [f"Machine: {m['model']}, {m['usable_cores']} usable cores ({isa or 'no AVX-512'}), "
             f"fp32 GEMM peak {_gemm_text(report['gemm'])} ({shape['threads']} threads). "
             f"Trial: {shape['model']} ({shape['n_params'] / 1e6:.1f}M params), "
             f"{shape.get('adapter') or 'LoRA r=' + str(shape.get('lora_r'))}, "
             f"batch {shape['batch_size']} x up to {shape['max_seq_len']} tokens, {shape['max_steps']} steps, "
             f"{shape['dtype']}, allocator {shape['allocator']}; {e['loop']['n']} + {e['hf_trainer']['n']} trials "
             f"interleaved. Measured {report['finished_at'][:10]} by `{report['invocation']}`, i.e. the sweep "
             f"`python -m src.train -m {' '.join(_trial_overrides(report['command']))}`.",
             "",
             "| quantity | our loop | transformers.Trainer | loop / Trainer |",
             "|---|---|---|---|"]
    for label, key, kind in rows:
        a, b = e["loop"][key], e["hf_trainer"][key]
        ratio = a["median"] / b["median"] if b["median"] else None
        cells = [f"{_fmt(x['median'], kind)} ({_fmt(x['min'], kind)}-{_fmt(x['max'], kind)})" for x in (a, b)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {_fmt(ratio, 'x')} |")
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for v in report["targets"]:
        kind = "x" if "vs" in v["target"] else "pct"
        met = "-" if v["met"] is None else ("yes" if v["met"] else "**no**")
        lines.append(f"| {v['target']} | {v['goal']} | {_fmt(v['measured'], kind)} | {met} |")
    return "\n".join(lines)


def _gemm_text(g: dict[str, Any]) -> str:
    if "processes" not in g:  # a benchmark sweep from before the peak was taken in several processes
        return f"{g['gflops_peak']:.0f} GFLOP/s"
    return (f"{g['gflops_peak']:.0f} GFLOP/s (the best of {g['processes']} processes of {g['reps']} products each, "
            f"half before and half after the sweep; their own peaks {g['gflops_peak_min']:.0f}-{g['gflops_peak']:.0f})")


def _trial_overrides(command: str) -> list[str]:
    """The sweep's own overrides, without the benchmark's housekeeping (sweep folder, study name)."""
    return [w for w in command.split()[4:] if not w.startswith("hydra.")]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "machine"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5, help="interleaved loop/Trainer pairs (default 5)")
    p.add_argument("--from", dest="from_dir", type=Path, help="summarise this benchmark sweep folder again")
    p.add_argument("--sweep-dir", type=Path, help="where the sweep's trials go (default multirun/bench-<time>)")
    p.add_argument("--out", type=Path, help="also write the JSON here (default bench/results/<machine>.json)")
    p.add_argument("--readme", type=Path, help="write the table into this file's speed markers")
    p.add_argument("--block", default="speed",
                   help="with --readme: the markers <!-- ratios:BLOCK:begin/end --> (default speed; this "
                        "project's README keeps one block per CPU: speed_xeon, speed_epyc)")
    p.add_argument("overrides", nargs="*", help="config overrides for every trial, e.g. cpu.threads=1")
    a = p.parse_args(argv)
    if a.pairs < 1:
        p.error("--pairs: give at least 1 (5 or more for numbers worth quoting)")
    if a.readme:
        check_readme_block(p, a.readme, a.block)
    machine = hw.probe()
    invocation = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])
    if a.from_dir:
        sweep_dir = a.from_dir.resolve()
        gemm_info = json.loads((sweep_dir / GEMM_FILE).read_text())
        sweep_info = json.loads((sweep_dir / SWEEP_FILE).read_text())
    else:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d_%H-%M-%S")
        sweep_dir = (a.sweep_dir or PROJECT_ROOT / "multirun" / f"bench-{stamp}").resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # The trials' own thread count, from their config (which also names a bad override before any work).
        threads = cpu.threads_for(compose(a.overrides).cpu)
        before = gemm(threads)
        sweep_info = run_sweep(sweep_dir, a.pairs, a.overrides, invocation)
        gemm_info = gemm_summary(before, gemm(threads))
        (sweep_dir / GEMM_FILE).write_text(json.dumps(gemm_info, indent=2))
    report: dict[str, Any] = {"machine": machine, "gemm": gemm_info, "command": " ".join(sweep_info["command"]),
                              "invocation": sweep_info.get("invocation", invocation),
                              "sweep_dir": str(sweep_dir), "sweep_wall_s": sweep_info["wall_s"],
                              "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
    report.update(collect(sweep_dir, gemm_info["gflops_peak"], sweep_info["wall_s"]))
    report["targets"] = measure.verdicts(report["summary"])
    text = json.dumps(report, indent=2)
    (sweep_dir / RESULT_FILE).write_text(text)
    out = a.out or PROJECT_ROOT / "bench" / "results" / f"{_slug(str(machine['model']))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    rendered = table(report)
    print(rendered)
    if a.readme:
        from analysis.ratios import replace_block

        a.readme.write_text(replace_block(a.readme.read_text(), rendered, a.block))
    print(f"wrote {out} and {sweep_dir / RESULT_FILE}", file=sys.stderr)
    return 0 if sweep_info["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
