"""``python -m bench.interference``: how much a competing process moves a trial's time objectives.

    python -m bench.interference [--rounds 3] [--start-after 0.25] [--busy-s 60] [--readme README.md] [OVERRIDE ...]

Runs the same trial (the default one, plus any overrides) ``--rounds`` times on an idle machine and
``--rounds`` times with a CPU-bound competitor that starts once the given share of the training steps
is done and runs for ``--busy-s`` seconds (or until the trial ends), interleaved (idle, busy, idle,
busy, ...): a transient neighbour, as another user's job on a shared machine. Reports the spread
of cost/train_s (plain wall time) and of cost/train_s_robust over all the runs, and what the busy
runs recorded about their neighbour. Run nothing else meanwhile: this measures the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from src import hw, results
from src import metrics as M
from src.config import compose
from src.paths import PROJECT_ROOT

CONDITIONS = ("idle", "busy")
# The competitor: one process that keeps one CPU busy, as a neighbour's job would.
BURNER = "while True: pass"
QUANTITIES = (M.COST_TRAIN_S, M.COST_TRAIN_S_ROBUST)


def _steps_logged(run_dir: Path) -> int:
    logs = list(run_dir.rglob(results.TRAIN_LOG))
    return len(logs[0].read_text().splitlines()) if logs else 0


def run_trial(run_dir: Path, overrides: list[str], busy_after_steps: int | None,
              busy_s: float | None = None) -> dict[str, Any]:
    """One trial in its own process; with ``busy_after_steps``, a competitor starts after that many
    logged training steps and is stopped after ``busy_s`` seconds (None: when the trial ends)."""
    cmd = [sys.executable, "-m", "src.train", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    burner: subprocess.Popen[bytes] | None = None
    started_at: int | None = None
    since = 0.0
    try:
        while proc.poll() is None:
            if busy_after_steps is not None and burner is None and started_at is None:
                done = _steps_logged(run_dir)
                if done >= busy_after_steps:
                    burner = subprocess.Popen([sys.executable, "-c", BURNER])
                    started_at, since = done, time.perf_counter()
            if burner is not None and busy_s is not None and time.perf_counter() - since >= busy_s:
                burner.kill()
                burner.wait()
                burner = None
            time.sleep(0.2)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    _, err = proc.communicate()
    found = list(run_dir.rglob(results.RESULT_FILE))
    record = json.loads(found[0].read_text()) if found else None
    if proc.returncode != 0 or record is None or record.get("status") != "completed":
        raise RuntimeError(f"trial in {run_dir} did not complete (exit {proc.returncode}):\n{err[-3000:]}")
    shares = record["cost_info"].get("interference", {})
    return {
        **{q: float(record["metrics"][q]) for q in QUANTITIES},
        "others_cpu_share_train": shares.get("train", {}).get("others_cpu_share"),
        "quiet_steps": shares.get("train", {}).get("quiet_steps"),
        "steps": int(record["metrics"][M.TRAIN_STEPS]),
        "busy": shares.get("busy"),
        "competitor_started_after_step": started_at,
    }


def _spread(values: list[float]) -> dict[str, float]:
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "spread": (max(values) - min(values)) / med}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per condition and over all runs: median, range and spread ((max - min) / median) of each time."""
    groups = {**runs, "all": [r for rs in runs.values() for r in rs]}
    return {g: {q: _spread([r[q] for r in rs]) for q in QUANTITIES} for g, rs in groups.items() if rs}


def measure(rounds: int, start_after: float, busy_s: float | None, overrides: list[str],
            out_dir: Path) -> dict[str, Any]:
    cfg = compose(overrides)  # a bad override is named before any trial runs
    busy_after = max(1, math.ceil(start_after * int(cfg.train.max_steps)))
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONDITIONS}
    for r in range(rounds):
        for condition in CONDITIONS:
            row = run_trial(out_dir / f"{condition}-{r + 1}", overrides,
                            busy_after if condition == "busy" else None, busy_s)
            runs[condition].append(row)
            print(f"round {r + 1} {condition}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return {"rounds": rounds, "competitor_after_steps": busy_after, "competitor_s": busy_s,
            "max_steps": int(cfg.train.max_steps),
            "runs": runs, "summary": summarize(runs)}


def _share_range(shares: list[float]) -> str:
    lo, hi = (f"{x:.0%}" for x in (min(shares, default=0.0), max(shares, default=0.0)))
    return lo if lo == hi else f"{lo}-{hi}"


def table(report: dict[str, Any]) -> str:
    s, m = report["summary"], report["machine"]
    busy = report["runs"]["busy"]
    shares = [r["others_cpu_share_train"] for r in busy if r["others_cpu_share_train"] is not None]
    quiet = [f"{r['quiet_steps']}/{r['steps']}" for r in busy]
    lines = [f"Machine: {m['model']}, {m['usable_cores']} usable cores. The default trial, {report['rounds']} "
             f"times idle and {report['rounds']} times with one CPU-bound competitor started after training "
             f"step {report['competitor_after_steps']} of {report['max_steps']} and kept "
             + (f"{report['competitor_s']:g} s" if report["competitor_s"] else "until the trial ended")
             + f", interleaved. Busy runs: others used {_share_range(shares)} of "
             f"the machine while they trained; quiet steps {', '.join(quiet)}; flagged busy "
             f"{sum(bool(r['busy']) for r in busy)}/{len(busy)}. Measured {report['finished_at'][:10]} by "
             f"`{report['invocation']}`.", "",
             "| runs | cost/train_s, s | spread | cost/train_s_robust, s | spread |", "|---|---|---|---|---|"]
    for group in ("idle", "busy", "all"):
        cells = []
        for q in QUANTITIES:
            x = s[group][q]
            cells += [f"{x['median']:.1f} ({x['min']:.1f}-{x['max']:.1f})", f"{x['spread']:.0%}"]
        lines.append(f"| {group} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.interference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="trials per condition (default 3)")
    p.add_argument("--start-after", type=float, default=0.25,
                   help="share of the training steps done before the competitor starts (default 0.25)")
    p.add_argument("--busy-s", type=float, default=60.0,
                   help="seconds the competitor runs (default 60; 0: until the trial ends)")
    p.add_argument("--out", type=Path, help="folder for the trials and interference.json "
                                            "(default bench/results/interference)")
    p.add_argument("--readme", type=Path, help="write the table between this file's interference markers")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.rounds < 1 or not 0 <= a.start_after < 1:
        p.error("--rounds: at least 1; --start-after: a share of the steps in [0, 1)")
    out = a.out or PROJECT_ROOT / "bench" / "results" / "interference"
    out.mkdir(parents=True, exist_ok=True)
    report = measure(a.rounds, a.start_after, a.busy_s or None, a.overrides, out)
    report.update(machine=hw.probe(), finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
                  invocation=" ".join(["python -m bench.interference", *(sys.argv[1:] if argv is None else argv)]))
    text = table(report)
    print(text)
    (out / "interference.json").write_text(json.dumps(report, indent=2))
    if a.readme:
        from analysis.ratios import replace_block

        a.readme.write_text(replace_block(a.readme.read_text(), text, "interference"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
