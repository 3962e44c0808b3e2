"""The speed benchmark: its arithmetic on records made here, and a real run of `python -m bench` on the
tiny model (both engines, JSON, README table). Speed targets are the benchmark's business, never a test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import measure
from src import hw
from src import metrics as M
from tests.conftest import TINY


def _trial(tmp_path: Path, name: str, step_rates: list[float], **timings: float) -> tuple[dict, Path]:
    d = tmp_path / name
    d.mkdir()
    d.joinpath("train_log.jsonl").write_text("".join(
        json.dumps({"step": i + 1, M.TRAIN_TOKENS_PER_S: r}) + "\n" for i, r in enumerate(step_rates)))
    record = {"timings": {"trial_wall_s": 100.0, "baseline_s": 20.0, "train_s": 60.0, "eval_s": 12.0,
                          "eval_gen_s": 8.0, **timings},
              "metrics": {M.COST_PEAK_RSS_MB: 3000.0, M.EVAL_GEN_TOKENS_PER_S: 40.0},
              "run": {"model": {"n_params": 100_000_000}}}
    return record, d


def test_trial_numbers_use_steps_after_warm_up_and_exclude_the_shared_baseline(tmp_path):
    record, d = _trial(tmp_path, "0", [10.0, 50.0, 100.0, 120.0, 110.0])
    n = measure.trial_numbers(record, d, gemm_gflops=100.0, gap_s=2.0)
    assert n["train_tokens_per_s"] == 110.0  # median of steps 3-5; steps 1-2 are warm-up
    assert n["mfu"] == pytest.approx(4 * 1e8 * 110.0 / 100e9)
    wall = 100.0 - 20.0 + 2.0  # the cached-once baseline is not this trial's cost; the sweep's gap is
    assert n["trial_wall_s"] == wall
    assert n["overhead_fraction"] == pytest.approx((wall - 72.0) / wall)
    assert n["eval_gen_fraction"] == pytest.approx(8.0 / wall)


def test_a_trial_without_steps_after_warm_up_is_refused(tmp_path):
    record, d = _trial(tmp_path, "0", [10.0, 50.0])
    with pytest.raises(ValueError, match="raise train.max_steps"):
        measure.trial_numbers(record, d, 100.0)


def test_summary_ratios_and_verdicts():
    def row(tok_s, rss, mfu=0.6):
        return {"train_tokens_per_s": tok_s, "mfu": mfu, "peak_rss_mb": rss, "eval_gen_tokens_per_s": 30.0,
                "eval_gen_fraction": 0.1, "eval_fraction": 0.2, "overhead_fraction": 0.04, "trial_wall_s": 100.0}

    s = measure.summarize({"loop": [row(200, 3000), row(180, 3100), row(220, 2900)],
                           "hf_trainer": [row(100, 4000), row(90, 4100), row(110, 3900)]})
    assert s["engines"]["loop"]["train_tokens_per_s"] == {"median": 200, "min": 180, "max": 220}
    assert s["ratios"]["train_tokens_per_s"] == 2.0 and s["ratios"]["peak_rss_mb"] == 0.75
    assert s["ratios"]["train_tokens_per_s_pairs"] == [2.0, 2.0, 2.0]
    verdicts = {v["target"]: v["met"] for v in measure.verdicts(s)}
    assert all(verdicts.values())
    s["engines"]["loop"]["mfu"]["median"] = 0.3
    assert {v["target"]: v["met"] for v in measure.verdicts(s)}["MFU (fp32, of measured GEMM peak)"] is False


def test_bench_runs_both_engines_interleaved_and_writes_json_and_readme(tmp_path, data_root, cache_dir):
    """Two pairs on the tiny model. Every step holds all six examples (batch 6), so both engines must
    count exactly the same real tokens: Trainer's own non-padding count against our loop's."""
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- ratios:speed:begin -->\nother CPU\n<!-- ratios:speed:end -->\n"
                      "<!-- ratios:speed_here:begin -->\nold\n<!-- ratios:speed_here:end -->\nkept\n")
    out, sweep = tmp_path / "bench.json", tmp_path / "sweep"
    args = [*TINY, "train.batch_size=6", "train.max_steps=3", f"data.root={data_root}",
            f"paths.cache_dir={cache_dir}", "logger=none"]
    env = {**os.environ, "PARETUNE_STUDY_STORAGE": str(tmp_path / "study.journal")}
    proc = subprocess.run([sys.executable, "-m", "bench", "--pairs", "2", "--sweep-dir", str(sweep), "--out", str(out),
                           "--readme", str(readme), "--block", "speed_here", *args],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert [(t["engine"], t["seed"], t["status"]) for t in report["trials"]] == [
        ("loop", 1, "completed"), ("hf_trainer", 1, "completed"), ("loop", 2, "completed"),
        ("hf_trainer", 2, "completed")]  # A B A B
    assert report["machine"]["usable_cores"] >= 1
    gemm = report["gemm"]  # the best of three fresh processes before the sweep and three after
    assert len(gemm["before"]) == len(gemm["after"]) == 3 and gemm["processes"] == 6
    peaks = [g["gflops_peak"] for g in gemm["before"] + gemm["after"]]
    assert gemm["gflops_peak"] == max(peaks) > 0 and gemm["gflops_peak_min"] == min(peaks)
    assert all(g["reps"] == 40 for g in gemm["before"] + gemm["after"])
    records = [json.loads((sweep / t["dir"] / "result.json").read_text()) for t in report["trials"]]
    # our loop fuses the shared-input projections by default; Trainer, the reference, runs peft's layers
    assert [bool(r["run"].get("fused_projections")) for r in records] == [True, False, True, False]
    tokens = {r["metrics"][M.TRAIN_TOKENS] for r in records}
    assert len(tokens) == 1 and tokens.pop() > 0
    for r in records:
        assert r["timings"]["trial_wall_s"] >= r["timings"]["train_s"] + r["timings"]["eval_s"]
        log = (sweep / Path(r["trial"]["dir"]).name / "train_log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in log] == [1, 2, 3]
    engines = report["summary"]["engines"]
    assert engines["loop"]["n"] == engines["hf_trainer"]["n"] == 2
    assert 0 < engines["loop"]["overhead_fraction"]["median"] < 1
    assert len(report["summary"]["ratios"]["train_tokens_per_s_pairs"]) == 2
    assert {v["target"] for v in report["targets"]} == set(measure.TARGETS)
    text = readme.read_text()
    assert "old" not in text and text.endswith("kept\n") and "\nother CPU\n" in text  # one block per CPU
    assert "the best of 6 processes of 40 products each" in text
    assert "| training tokens/s" in text and report["machine"]["model"] in text and "transformers.Trainer" in text
    # Summarising the same sweep again gives the same numbers.
    again = subprocess.run([sys.executable, "-m", "bench", "--from", str(sweep), "--out", str(tmp_path / "again.json")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "again.json").read_text())["summary"] == report["summary"]


def test_ablation_prints_every_variant_against_the_plain_path(data_root, cache_dir):
    proc = subprocess.run([sys.executable, "-m", "bench.ablate", "--steps", "1", "--rounds", "2", "--profile", "1",
                           *TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "x plain" not in line]
    from bench.ablate import BF16_MATMUL, OUR_LOOP, VARIANTS, variants

    names = [r.split(" | ")[0].lstrip("| ") for r in rows]
    assert names == list(variants()) and names[:len(VARIANTS)] == list(VARIANTS)
    flags = hw.probe()["flags"]
    assert (BF16_MATMUL in names) == bool(flags["amx_bf16"] or flags["avx512_bf16"])  # only where bf16 is native
    assert " | 1.00x | " in rows[0]  # x plain
    ours = next(r for r in rows if r.startswith(f"| {OUR_LOOP} |"))
    assert ours.endswith("| 1.00x |")  # x our loop
    assert "aten::mm" in proc.stdout and "Self CPU" in proc.stdout  # the profile of our loop's step


def test_eval_speed_runs_both_decoders_interleaved_and_writes_the_readme_block(tmp_path, data_root, cache_dir):
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- ratios:eval_speed:begin -->\nold\n<!-- ratios:eval_speed:end -->\nafter\n")
    out = tmp_path / "eval_speed.json"
    proc = subprocess.run([sys.executable, "-m", "bench.eval_speed", "--rounds", "2", "--examples", "3",
                           "--hf-batch-size", "2", "--out", str(out), "--readme", str(readme),
                           *TINY, "eval.max_new_tokens=6", f"data.root={data_root}", f"paths.cache_dir={cache_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [len(report["runs"][d]) for d in ("hf", "fast")] == [2, 2]
    assert report["identical_summaries"] == 3 and report["batch_size"]["hf"] == 2
    losses = {round(r["eval_loss"], 5) for d in ("hf", "fast") for r in report["runs"][d]}
    assert len(losses) == 1  # both decoders, every round: one eval loss
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| generation tokens/s |" in text and "3/3 generated summaries identical" in text
    assert all(0 < r["eval_prompt_s"] < r["eval_gen_s"] for r in report["runs"]["fast"])
    assert "| of the fast generation: the prompt pass, s |" in text


def test_interference_summary_is_the_spread_of_each_time_over_the_runs():
    from bench import interference

    runs = {"idle": [{M.COST_TRAIN_S: 100.0, M.COST_TRAIN_S_ROBUST: 98.0},
                     {M.COST_TRAIN_S: 110.0, M.COST_TRAIN_S_ROBUST: 102.0}],
            "busy": [{M.COST_TRAIN_S: 150.0, M.COST_TRAIN_S_ROBUST: 100.0}]}
    s = interference.summarize(runs)
    assert s["all"][M.COST_TRAIN_S] == {"median": 110.0, "min": 100.0, "max": 150.0, "spread": 50 / 110}
    assert s["all"][M.COST_TRAIN_S_ROBUST]["spread"] == pytest.approx(4 / 100)
    assert s["busy"][M.COST_TRAIN_S]["spread"] == 0.0 and set(s) == {"idle", "busy", "all"}


def test_interference_bench_runs_idle_and_busy_trials_and_writes_the_readme_block(tmp_path, data_root, cache_dir):
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- ratios:interference:begin -->\nold\n<!-- ratios:interference:end -->\nafter\n")
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "bench.interference", "--rounds", "1", "--start-after", "0.5",
                           "--busy-s", "0", "--out", str(out), "--readme", str(readme), *TINY, "train.max_steps=8",
                           "logger=none",
                           f"data.root={data_root}", f"paths.cache_dir={cache_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "interference.json").read_text())
    assert report["competitor_after_steps"] == 4 and report["max_steps"] == 8
    idle, busy = report["runs"]["idle"][0], report["runs"]["busy"][0]
    assert idle["competitor_started_after_step"] is None and busy["competitor_started_after_step"] >= 4
    for row in (idle, busy):
        assert row["steps"] == 8 and 0 <= row["quiet_steps"] <= 8
        assert row[M.COST_TRAIN_S] > 0 and row[M.COST_TRAIN_S_ROBUST] > 0
    assert (out / "idle-1").is_dir() and (out / "busy-1").is_dir()
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| all |" in text and "cost/train_s_robust" in text


def test_cpu_ablation_runs_each_variant_in_its_own_worker_process_with_its_settings(tmp_path, data_root, cache_dir):
    """bench.ablate_cpu: one process per variant, started with the trial worker's environment plus the
    variant's own overrides and variables, read back inside each process (threads, malloc settings)."""
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- ratios:ablation_cpu:begin -->\nold\n<!-- ratios:ablation_cpu:end -->\nb\n")
    tunables = "glibc.malloc.trim_threshold=268435456"
    one = f"one=cpu.threads=1 cpu.allocator=system GLIBC_TUNABLES={tunables}"
    proc = subprocess.run([sys.executable, "-m", "bench.ablate_cpu", "--steps", "2", "--rounds", "2",
                           "--variant", "default=", "--variant", one,
                           "--readme", str(readme), *TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "x first" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| default", "| one"]
    from src import hw

    auto = "tcmalloc" if hw.find_allocator("auto") else "system"  # the default: tcmalloc where installed
    assert f"| {auto} malloc, " in rows[0] and rows[0].endswith("| 1.00x |")
    assert f"system malloc, GLIBC_TUNABLES={tunables}, 1 threads" in rows[1]
    assert "(1 steps per variant after warm-up, interleaved" in proc.stdout  # round 0 and each round's step 1
    assert "one=cpu.threads=1 cpu.allocator=system" in readme.read_text() and "\nold\n" not in readme.read_text()
    bad = subprocess.run([sys.executable, "-m", "bench.ablate_cpu", "--variant", "x", "--variant", "y=cpu.threads=1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected NAME=SETTINGS" in bad.stderr


def test_ablation_ratios_pair_the_steps_of_variants_that_train_on_the_same_batches():
    """A slow moment of the machine during one variant's step moves the ratio of medians, not the median of
    step-by-step ratios; variants whose batches differ from our loop's get the ratio of medians."""
    from bench.ablate import OUR_LOOP, Variant, table

    todo = {"plain": Variant(False, False), OUR_LOOP: Variant(True, True), "fused": Variant(True, True, True)}
    rates = {"plain": [50.0, 100.0, 150.0], OUR_LOOP: [100.0, 200.0, 300.0], "fused": [110.0, 220.0, 150.0]}
    rows = {r.split(" | ")[0].lstrip("| "): r.split(" | ") for r in table(rates, todo, "cmd").splitlines()
            if r.startswith("| ") and "x plain" not in r}
    assert rows["fused"][4] == "1.10x |"           # paired: 1.1, 1.1, 0.5 (the ratio of medians: 0.75)
    assert rows[OUR_LOOP][3] == "2.00x"            # against plain, other batches: 200 / 100
    assert rows["fused"][1:3] == ["150.0", "110-220"]
    assert "3 steps per variant after warm-up, system malloc" in table(rates, todo, "cmd")


@pytest.mark.parametrize("module", ["bench", "bench.ablate"])
def test_a_readme_block_that_does_not_exist_is_named_before_any_measuring(tmp_path, module):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- ratios:speed_xeon:begin -->\n<!-- ratios:speed_xeon:end -->\n")
    proc = subprocess.run([sys.executable, "-m", module, "--readme", str(readme), "--block", "speed_arm"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "<!-- ratios:speed_arm:begin -->" in proc.stderr and "its named blocks: speed_xeon" in proc.stderr
    assert "Traceback" not in proc.stderr and readme.read_text().count("speed_xeon") == 2
