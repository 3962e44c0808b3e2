"""The training loop on a small Llama built in-process (no tokenizer needed)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from src import loop
from src.data import Example


def _tcfg(**kw):
    base = {"max_steps": 6, "epochs": None, "time_budget_s": None, "lr": 0.05, "scheduler": "constant",
            "warmup_ratio": 0.0, "weight_decay": 0.0, "batch_size": 2, "grad_accum": 1, "max_grad_norm": 1.0,
            "gradient_checkpointing": False, "group_by_length": False, "seed": 0, "log_every": 1}
    return OmegaConf.create({**base, **kw})


def _model():
    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, pad_token_id=0))
    return get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate((5, 9, 7, 12)):
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        out.append(Example(str(i), ids[:3], ids[3:], "", False))
    return out


@pytest.mark.parametrize("kw,expected", [
    ({"max_steps": 7}, 7),
    ({"max_steps": None, "epochs": 1}, 2),                  # 4 examples / batch 2
    ({"max_steps": None, "epochs": 2.5, "grad_accum": 2}, 3),  # 1 step an epoch
    ({"max_steps": None, "epochs": 0.1}, 1),
])
def test_total_steps(kw, expected):
    assert loop.total_steps(_tcfg(**kw), 4) == expected


def test_collate_pads_right_and_masks_prompt_and_padding():
    a, b = Example("a", [5, 6], [7], "", False), Example("b", [5], [8, 9, 10], "", False)
    batch = loop.collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 7, -100], [-100, 8, 9, 10]]


def test_batches_cover_every_example_each_epoch():
    ex = _examples()
    stream = loop.batches(ex, 3, seed=0)
    first_epoch = [e.id for _ in range(2) for e in next(stream)]
    assert sorted(first_epoch) == ["0", "1", "2", "3"]


def test_loss_falls_and_every_step_is_logged():
    rows = []
    # batch = the whole set, so each step's loss is measured on the same data
    stats = loop.train(_model(), _examples(), _tcfg(max_steps=15, batch_size=4), pad_id=0, on_log=rows.append)
    assert stats.steps == 15 and [r["step"] for r in rows] == list(range(1, 16))
    assert stats.losses[-1] < stats.losses[0] - 0.25
    assert stats.final_loss == pytest.approx(stats.losses[-1])  # last 10% of 15 steps = the last one


def test_tokens_count_real_tokens_only():
    ex = _examples()
    stats = loop.train(_model(), ex, _tcfg(max_steps=2, batch_size=4), pad_id=0, on_log=lambda r: None)
    assert stats.tokens == 2 * sum(len(e.input_ids) for e in ex)  # padding never counted


def test_grad_accumulation_and_checkpointing_run():
    ex = _examples()
    stats = loop.train(_model(), ex, _tcfg(max_steps=2, grad_accum=2, gradient_checkpointing=True),
                       pad_id=0, on_log=lambda r: None)
    assert stats.steps == 2 and stats.tokens == 2 * sum(len(e.input_ids) for e in ex)


def test_time_budget_stops_training_early():
    stats = loop.train(_model(), _examples(), _tcfg(max_steps=1000, time_budget_s=1e-6), pad_id=0,
                       on_log=lambda r: None)
    assert stats.steps == 1 and stats.stopped_by == "time_budget"


def test_only_lora_weights_change():
    net = _model()
    before = {k: v.clone() for k, v in net.named_parameters()}
    loop.train(net, _examples(), _tcfg(max_steps=2), pad_id=0, on_log=lambda r: None)
    changed = {k for k, v in net.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)


def test_divergence_stops_with_a_clear_error():
    class Diverging(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, attention_mask, labels):
            return type("Out", (), {"loss": self.w.sum() * float("nan")})

    with pytest.raises(FloatingPointError, match="step 1: training diverged; lower train.lr"):
        loop.train(Diverging(), _examples(), _tcfg(max_steps=3), pad_id=0, on_log=lambda r: None)


def test_target_loss_equals_the_models_own_loss_and_gradients():
    """The loss on labelled positions only (head and cross-entropy skip the prompt) is the causal-LM
    loss the model computes over the full vocabulary projection, value and LoRA gradients alike."""
    net, batch = _model(), loop.collate(_examples(), pad_id=0)
    reference = net(**batch).loss
    reference.backward()
    expected = {k: p.grad.clone() for k, p in net.named_parameters() if p.requires_grad}
    net.zero_grad(set_to_none=True)
    fast = loop.target_loss(net, batch)
    fast.backward()
    assert loop.body_and_head(net) is not None  # the fast path was taken
    assert fast.item() == pytest.approx(reference.item(), rel=1e-6)
    for k, p in net.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[k], rtol=1e-5, atol=1e-7)


# Real architectures that transform the head's logits, each with one of loop._LOGIT_TRANSFORMS:
# Gemma 2 caps them (tanh), Cohere multiplies and Granite divides them by a constant.
TRANSFORMED_LOGITS = [
    (Gemma2ForCausalLM, Gemma2Config, {"final_logit_softcapping": 0.5, "head_dim": 8}),
    (CohereForCausalLM, CohereConfig, {"logit_scale": 4.0}),
    (GraniteForCausalLM, GraniteConfig, {"logits_scaling": 0.25}),
]


@pytest.mark.parametrize(("model_cls", "config_cls", "transform"), TRANSFORMED_LOGITS,
                         ids=[c[0].__name__ for c in TRANSFORMED_LOGITS])
def test_models_with_transformed_logits_take_the_plain_path(model_cls, config_cls, transform):
    """The loss trained on is the model's own, transform included. Projecting the body's output with
    the head, as the fast path does, would skip the transform: on these models that is another loss."""
    torch.manual_seed(0)
    # init_range 0.5: logits wide enough that the transform changes the loss a lot (at 0.02 a softcap
    # of 0.5 is nearly the identity, and the two losses would agree to 3 digits)
    base = model_cls(config_cls(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, initializer_range=0.5, **transform))
    net = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = loop.collate(_examples(), pad_id=0)
    own = net(**batch).loss.item()
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    untransformed = torch.nn.functional.cross_entropy(base.get_output_embeddings()(hidden[:, :-1][keep]),
                                                      labels[keep]).item()
    assert abs(untransformed - own) > 1.0, (untransformed, own)  # the transform matters on this model
    assert loop.target_loss(net, batch).item() == pytest.approx(own, rel=1e-6)
    assert loop.body_and_head(net) is None  # the plain path was taken


def _padding(examples, batch_size, by_length):
    stream = loop.batches(examples, batch_size, seed=3, by_length=by_length)
    pad = 0
    for _ in range(len(examples) // batch_size):
        lengths = [len(e.input_ids) for e in next(stream)]
        pad += len(lengths) * max(lengths) - sum(lengths)
    return pad


def test_length_grouping_covers_every_example_each_epoch_with_less_padding():
    g = torch.Generator().manual_seed(2)
    ex = [Example(str(i), [1] * int(n), [2, 3], "", False)
          for i, n in enumerate(torch.randint(5, 300, (400,), generator=g))]
    stream = loop.batches(ex, 4, seed=3, by_length=True)
    for _ in range(2):  # two epochs, each a permutation of the examples
        assert sorted(e.id for _ in range(100) for e in next(stream)) == sorted(e.id for e in ex)
    assert _padding(ex, 4, by_length=True) < 0.2 * _padding(ex, 4, by_length=False)


def test_length_grouped_batches_come_in_random_order_so_a_short_run_is_not_biased_to_long_examples():
    """A 16-step run sees a fair sample of the epoch's batches: across seeds, the first 16 batches are
    as long on average as the whole epoch (a sorted order would put the longest first)."""
    g = torch.Generator().manual_seed(4)
    ex = [Example(str(i), [1] * int(n), [2], "", False)
          for i, n in enumerate(torch.randint(5, 300, (800,), generator=g))]
    epoch_mean = sum(len(e.input_ids) for e in ex) / len(ex)
    first = [len(e.input_ids) for seed in range(30)
             for stream in [loop.batches(ex, 4, seed=seed, by_length=True)] for _ in range(16) for e in next(stream)]
    assert abs(sum(first) / len(first) / epoch_mean - 1) < 0.1
