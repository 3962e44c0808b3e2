"""Memory that follows the quantized size, and the synthetic model ladder (model=synthetic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.__main__ import main as analysis_main
from src import model, worker
from src.config import ConfigError, compose
from tests.conftest import TINY, run_cli

SPEED_MEMORY = "objectives=[{name:train/tokens_per_s,direction:maximize},{name:cost/peak_rss_mb,direction:minimize}]"
# A synthetic size small enough for a test: 4 layers of a 256-wide Llama with SmolLM2's vocabulary.
SMALL = ["model=synthetic", "model.size=t",
         "+model.sizes.t={hidden_size:256,num_layers:4,num_heads:4,num_kv_heads:2,intermediate_size:512,init_std:0.02}"]


def test_a_quantized_trial_never_loads_the_fp32_model(tmp_path, data_root, cache_dir, monkeypatch):
    def fp32_load(*args, **kwargs):
        raise AssertionError("a quantized trial loaded the fp32 model")

    monkeypatch.setattr(model, "load", fp32_load)
    cfg = compose([*TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}", "logger=none", "quant=bnb_nf4",
                   "model.shape.hidden_size=64", "model.shape.intermediate_size=128"])
    t = worker.Trial(cfg, tmp_path)
    net, inputs = worker._load(t)
    assert t.run["quant"]["quantized_layers"] == {"Linear4bit": 2 * 7}
    assert type(net.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # loaded quantized, not converted later
    fp32 = model.tiny_model(cfg.model.shape, inputs.tok, 0)
    assert t.run["model"]["n_params"] == sum(p.numel() for p in fp32.parameters())  # as the architecture has them
    assert "load_s" in t.timings and not (tmp_path / ".base").exists()


def test_synthetic_weights_are_written_once_in_shards_and_load(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(model, "SYNTHETIC_SHARD_BYTES", 4 * 2**20)  # several shards from a small model
    cfg = compose([*SMALL, f"paths.cache_dir={tmp_path / 'cache'}", "logger=none", SPEED_MEMORY])
    folder = model.synthetic_dir(cfg.model, tmp_path / "cache")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]  # tied
    stamp = (folder / ".complete").stat().st_mtime_ns
    assert model.synthetic_dir(cfg.model, tmp_path / "cache") == folder  # found, not written again
    assert (folder / ".complete").stat().st_mtime_ns == stamp
    tok, net, facts = model.load(cfg.model, tmp_path / "cache", 0)
    assert facts["synthetic"] == model.SYNTHETIC_NOTE and facts["dtype"] == "float32"
    assert facts["n_params"] == 49152 * 256 + 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512 + 2 * 256) + 256
    norms = [p for n, p in net.named_parameters() if n.endswith("norm.weight")]
    assert all(bool((p == 1).all()) for p in norms)
    weight = net.model.layers[0].mlp.up_proj.weight
    assert 0.015 < float(weight.detach().std()) < 0.025  # Llama's initialisation, init_std 0.02 (through bf16)


@pytest.mark.parametrize(("overrides", "fragment"), [
    ([], "objectives: 'eval/rougeL' is not measured on model=synthetic"),
    (["model.size=5b", SPEED_MEMORY], "model.size: '5b' is not one of model.sizes"),
])
def test_synthetic_refuses_what_it_cannot_measure(data_root, overrides, fragment):
    with pytest.raises(ConfigError, match="(?s)" + fragment.replace("(", r"\(").replace("[", r"\[")):
        compose(["model=synthetic", f"data.root={data_root}", "logger=none", *overrides])


def test_a_synthetic_trial_measures_speed_and_memory_only(tmp_path, data_root, cache_dir, capsys):
    proc = run_cli([*SMALL, f"data.root={data_root}", f"paths.cache_dir={cache_dir}", "logger=none", SPEED_MEMORY,
                    f"hydra.run.dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2",
                    "train.max_seq_len=128", "quant=bnb_nf4", "eval.num_examples=1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "completed", record.get("error")
    assert record["run"]["model"]["synthetic"] == "synthetic: speed and memory only"
    assert record["run"]["eval_model"] == "not evaluated (synthetic: speed and memory only)"
    assert not any(k.startswith("eval/") for k in record["metrics"]) and record["baseline"] == {}
    assert "baseline" not in record["run"] and "baseline_s" not in record["timings"]
    assert set(record["objectives"]) == {"train/tokens_per_s", "cost/peak_rss_mb"}
    assert record["metrics"]["train/tokens_per_s"] > 0 and record["metrics"]["cost/adapter_mb"] > 0
    # each phase's own peak; the trial's is the highest of them (loading maps the checkpoint's pages)
    by_phase = record["cost_info"]["peak_rss_mb_by_phase"]
    assert by_phase["per_phase"] and set(by_phase["phases"]) == {"load", "train", "eval"}
    assert record["metrics"]["cost/peak_rss_mb"] == max(by_phase["phases"].values())
    assert record["metrics"]["cost/train_peak_rss_mb"] == by_phase["phases"]["train"]
    assert record["run"]["quant"]["quantized_layers"] == {"Linear4bit": 4 * 7}
    # the report says so, and draws its front on speed and memory: no quality axis exists
    assert analysis_main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report"), "--no-png"]) == 0
    summary = (tmp_path / "report" / "report.md").read_text()
    assert "**synthetic: speed and memory only** (synthetic_t" in summary and "eval/" not in summary
    # the scaling table: measured beside planned
    assert analysis_main(["scaling", str(tmp_path / "run" / "result.json"), "--gemm-gflops", "100"]) == 0
    table = capsys.readouterr().out
    assert "| synthetic_t | 0.01B | bnb nf4 | 1 |" in table and "Synthetic models" in table


def _peak_rss(tmp_path: Path, data_root: Path, cache_dir: Path, quant: str) -> float:
    run = tmp_path / quant
    proc = run_cli(["model=synthetic", "model.size=m", f"data.root={data_root}", f"paths.cache_dir={cache_dir}",
                    "+model.sizes.m={hidden_size:1024,num_layers:8,num_heads:16,num_kv_heads:4,intermediate_size:4096,"
                    "init_std:0.02}", "logger=none", SPEED_MEMORY, f"hydra.run.dir={run}", "train.max_steps=1",
                    "train.batch_size=1", "train.max_seq_len=128", f"quant={quant}", "eval.num_examples=1"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "result.json").read_text())
    assert record["status"] == "completed", record.get("error")
    return float(record["metrics"]["cost/peak_rss_mb"])


def test_a_4_bit_trial_peaks_below_the_fp32_one(tmp_path, data_root, cache_dir):
    # 172M parameters (122M of them in quantized layers: 490 MB in fp32, 61 MB in nf4). Before quantized
    # trials loaded quantized, their peak was the fp32 one plus the quantized copy.
    fp32, nf4 = (_peak_rss(tmp_path, data_root, cache_dir, q) for q in ("none", "bnb_nf4"))
    assert nf4 < fp32 - 250, (fp32, nf4)


def test_the_scaling_table_shows_the_spread_of_repeated_trials():
    from analysis import scaling

    row = {"model": "synthetic_1b", "params_b": 1.07, "backend": "fp32", "n": 2, "tokens_per_s": 57.5,
           "tokens_per_s_range": [55.1, 59.9], "planned_tokens_per_s": 50.0, "peak_rss_mb": 6677.0,
           "peak_rss_mb_range": [6650.0, 6704.0], "planned_peak_rss_mb": 6900.0, "load_s": 3.2, "adapter_mb": 43.0,
           "synthetic": True, "busy": False, "rss_vs_fp32": 1.0}
    text = scaling.table([row, {**row, "n": 1, "backend": "bnb nf4"}], 335.0, "a CPU")
    assert "| 2 | 57.5 [55.1-59.9] | 50 (0.87x) | 6677 [6650-6704] | 1.00x |" in text
    assert "| 1 | 57.5 | 50 (0.87x) | 6677 | 1.00x |" in text  # one trial: no spread to show
    assert "lowest and highest in brackets" in text
    # records with training's own peak: a column of its own, and what vs fp32 and the plan compare
    trained = {**row, "train_peak_rss_mb": 6000.0, "train_peak_rss_mb_range": [5990.0, 6010.0]}
    text = scaling.table([trained, {**trained, "n": 1, "backend": "bnb nf4", "train_peak_rss_mb": 3000.0,
                                    "rss_vs_fp32": 0.5}], 335.0, "a CPU")
    assert "| 6677 [6650-6704] | 6000 [5990-6010] | 1.00x | 6.9e+03 (1.15x) |" in text
    assert "| 6677 | 3000 | 0.50x | 6.9e+03 (2.30x) |" in text and "training's own peak" in text
    older = {**trained, "train_peak_n": 1, "train_peak_rss_mb_range": [6000.0, 6000.0]}  # 1 of its 2 trials had it
    assert "| 6677 [6650-6704] | 6000 (1 of 2) | 1.00x |" in scaling.table([older], 335.0, "a CPU")
