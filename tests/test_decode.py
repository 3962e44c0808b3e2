"""The fast eval decoder against the reference path (model.generate and a separate teacher-forced
loss pass): the same greedy tokens and the same per-example losses, on small random Llama models."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from src import decode, evaluate
from src.data import Example

VOCAB, PAD = 64, 0


def _model(seed: int = 0, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, intermediate_size=64, max_position_embeddings=512,
                         initializer_range=0.5, pad_token_id=PAD, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [Example(f"ex{i}", [rng.randrange(1, VOCAB) for _ in range(rng.randint(2, 30))],
                    [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 12))], "", False) for i in range(n)]


def _reference_tokens(model, examples, max_new, eos):
    """model.generate one prompt at a time (no padding at all), cut at the end token."""
    out = []
    for ex in examples:
        ids = torch.tensor([ex.prompt_ids])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=eos, pad_token_id=PAD)[0, ids.shape[1]:].tolist()
        out.append(gen[: gen.index(eos)] if eos in gen else gen)
    return out


def _frequent_token(model, examples, max_new) -> int:
    """A token the model generates often, at different steps in different rows: as the end token,
    rows finish at different times, so finished rows leave the batch mid-way."""
    counts: dict[int, int] = {}
    for row in _reference_tokens(model, examples, max_new, eos=VOCAB + 1):
        for t in row[1:]:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_fast_decoder_gives_the_reference_tokens_and_losses(batch_size):
    model, examples = _model(), _examples(11)
    eos = _frequent_token(model, examples, 12)
    want = _reference_tokens(model, examples, 12, eos)
    assert len({len(t) for t in want}) > 2  # rows do finish at different steps
    got = decode.run(model, examples, 12, batch_size, PAD, eos, with_loss=True, with_generation=True)
    assert got.tokens == want
    losses = evaluate.losses_batched(model, examples, 4, PAD)
    assert got.loss_counts == [c for _, c in losses] == [len(ex.target_ids) for ex in examples]
    assert got.loss_sums == pytest.approx([s for s, _ in losses], rel=1e-4, abs=1e-4)


def test_fast_decoder_loss_alone_and_generation_alone_match_both_together():
    model, examples = _model(1), _examples(7, seed=1)
    both = decode.run(model, examples, 6, 4, PAD, 5, with_loss=True, with_generation=True)
    loss_only = decode.run(model, examples, 6, 4, PAD, 5, with_loss=True, with_generation=False)
    gen_only = decode.run(model, examples, 6, 4, PAD, 5, with_loss=False, with_generation=True)
    assert loss_only.loss_sums == pytest.approx(both.loss_sums, rel=1e-5)
    assert loss_only.tokens == [[] for _ in examples] and gen_only.loss_sums is None
    assert gen_only.tokens == both.tokens


def test_prompts_longer_than_the_prefill_group_and_one_token_references():
    model = _model(2, kv_heads=4)
    rng = random.Random(3)
    examples = [Example(str(i), [rng.randrange(1, VOCAB) for _ in range(n)], [rng.randrange(1, VOCAB)], "", False)
                for i, n in enumerate([1, 40, 2, 39, 7, 3, 25])]
    got = decode.run(model, examples, 5, 7, PAD, VOCAB + 1, with_loss=True, with_generation=True)
    assert got.tokens == _reference_tokens(model, examples, 5, VOCAB + 1)
    assert got.loss_sums == pytest.approx([s for s, _ in evaluate.losses_batched(model, examples, 1, PAD)],
                                          rel=1e-4, abs=1e-4)


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{t}" for t in ids)


def _ecfg(decoder: str) -> OmegaConf:
    return OmegaConf.create({"decoder": decoder, "max_new_tokens": 8, "batch_size": 4, "metrics": ["loss", "rouge"],
                             "bertscore_package": "unused", "bertscore_num_layers": 1})


def test_evaluate_gives_the_same_scores_and_rows_with_either_decoder():
    model, examples = _model(4), _examples(9, seed=4)
    examples = [Example(ex.id, ex.prompt_ids, ex.target_ids, " ".join(f"w{t}" for t in ex.target_ids), False)
                for ex in examples]
    eos = _frequent_token(model, examples, 8)
    timings: dict[str, float] = {}
    fast, fast_rows = evaluate.evaluate(model, _Tok(), examples, _ecfg("fast"), PAD, eos, 3, timings)
    ref, ref_rows = evaluate.evaluate(model, _Tok(), examples, _ecfg("hf"), PAD, eos, 3)
    assert set(timings) == {"eval_loss_s", "eval_gen_s", "eval_score_s", "eval_prompt_s"}
    assert 0 < timings["eval_prompt_s"] < timings["eval_gen_s"]  # the prompt pass is part of generation
    assert fast.pop("eval/gen_tokens_per_s") > 0 and ref.pop("eval/gen_tokens_per_s") > 0
    assert fast == pytest.approx(ref, rel=1e-5)
    assert [r["prediction"] for r in fast_rows] == [r["prediction"] for r in ref_rows]
    numbers = evaluate.per_example(fast_rows)
    assert [r["id"] for r in numbers] == [ex.id for ex in examples]
    assert all("prediction" not in r and "reference" not in r for r in numbers)  # no text beside the record
    assert sum(r["eval/loss"] * r["eval/loss_tokens"] for r in numbers) / sum(
        r["eval/loss_tokens"] for r in numbers) == pytest.approx(fast["eval/loss"], rel=1e-6)


def test_models_the_fast_decoder_cannot_drive_take_the_reference_path():
    class Opaque(torch.nn.Module):  # no separable decoder and head
        config = LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)

    assert evaluate.decoder_for(Opaque(), "fast") == "hf"
    assert evaluate.decoder_for(_model(), "fast") == "fast"
    assert evaluate.decoder_for(_model(), "hf") == "hf"
    sliding = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64,
                                           layer_types=["sliding_attention", "full_attention"], sliding_window=8))
    assert not decode.supported(sliding)  # rewinding or forking a sliding window would lose states


def test_under_bf16_autocast_evaluation_takes_the_reference_path():
    """cpu.dtype=bf16: autocast leaves keys fp32 and values bf16, which a static cache cannot hold."""
    model, examples = _model(5), _examples(4, seed=5)
    examples = [Example(ex.id, ex.prompt_ids, ex.target_ids, "w1", False) for ex in examples]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert evaluate.decoder_for(model, "fast") == "hf"
        scores, rows = evaluate.evaluate(model, _Tok(), examples, _ecfg("fast"), PAD, VOCAB + 1, 2)
    assert len(rows) == 4 and scores["eval/loss"] > 0
    assert evaluate.decoder_for(model, "fast") == "fast"  # outside autocast: the fast path again


def test_generation_attends_only_over_the_positions_written_so_far():
    """The generation cache hands attention the filled positions (and sizes the mask to them), not
    the whole preallocated length."""
    config = _model().config
    cache = decode._filled_cache(config, 20)
    layer = cache.layers[0]
    shape = (2, config.num_key_value_heads, 5, config.hidden_size // config.num_attention_heads)
    keys, values = layer.update(torch.randn(shape), torch.randn(shape))
    assert keys.shape[2] == values.shape[2] == 5 and layer.keys.shape[2] == 20  # preallocated, written in place
    assert layer.get_mask_sizes(1) == (6, 0)
    one = (2, shape[1], 1, shape[3])
    keys, _ = layer.update(torch.ones(one), torch.ones(one))
    assert keys.shape[2] == 6 and torch.equal(layer.keys[:, :, 5:6], torch.ones(one))
    cache.reorder_cache(torch.tensor([1]))  # a finished row leaves: the written length stays
    single = (1, *one[1:])
    assert layer.update(torch.zeros(single), torch.zeros(single))[0].shape[:3] == (1, shape[1], 7)
