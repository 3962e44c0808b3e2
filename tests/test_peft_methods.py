"""Every PEFT method (conf/peft, src/adapters.py) on the tiny model: it trains through our loop, saves,
reloads and evaluates as deployed; what a method needs each step (AdaLoRA's rank allocation, its
penalty) happens in both engines; pairs peft cannot train are refused before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from peft import PeftModel

from src import adapters, data, evaluate, loop, model, quant
from src.config import ConfigError, to_plain, validate
from tests.conftest import TINY, run_cli

# The tiny model's layers are 32 and 64 wide: OFT's blocks must divide them.
EXTRA = {"oft": ["oft.block_size=16"]}
TRAIN = ["model=tiny", "train.max_seq_len=128", "train.max_steps=8", "train.lr=0.02", "train.scheduler=constant",
         "train.warmup_ratio=0", "train.batch_size=2", "eval.metrics=[loss,rouge]", "eval.max_new_tokens=4",
         "eval.batch_size=2"]


def _setup(cfg_factory, method: str, *extra: str):
    cfg = cfg_factory(*TRAIN, f"peft={method}", *EXTRA.get(method, []), *extra)
    validate(cfg)
    cfg = OmegaConf.create(to_plain(cfg))  # what the worker reads
    tok, base, _ = model.load(cfg.model, Path(cfg.paths.cache_dir), 0)
    builder = data.PromptBuilder(tok, cfg.data.instruction, cfg.train.max_seq_len, str(cfg.data.truncation))
    train_ex, eval_ex, _ = data.load_splits(cfg.data, builder, 2, 0)
    return cfg, tok, base, builder, train_ex, eval_ex


def _logits(net, batch) -> torch.Tensor:
    with torch.no_grad():
        out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[:, adapters.prepended_positions(net):]


@pytest.mark.parametrize("method", adapters.METHODS)
def test_every_method_trains_saves_reloads_and_evaluates(cfg_factory, tmp_path, method):
    cfg, tok, base, builder, train_ex, eval_ex = _setup(cfg_factory, method)
    net = adapters.attach(base, cfg, 8)
    facts = adapters.describe(net, cfg)
    assert facts["method"] == method and facts["trainable_params"] > 0
    assert facts["trainable_params"] < sum(p.numel() for p in net.parameters()) / 2  # only the adapter trains
    pad = int(tok.pad_token_id)
    net.eval()
    before = evaluate.eval_loss(net, train_ex, 2, pad)
    stats = loop.train(net, train_ex, cfg.train, pad, on_log=lambda row: None)
    after = evaluate.eval_loss(net, train_ex, 2, pad)
    assert stats.steps == 8 and after < before - 0.05, (before, after)
    # the summary positions' loss, as our loop takes it, is peft's own forward's (whose loss also holds
    # AdaLoRA's penalty; prompt tuning's virtual tokens come first in its logits)
    batch = loop.collate(train_ex[:2], pad)
    with torch.no_grad():
        logits, targets, _ = loop.label_logits(net, batch)
        ours = F.cross_entropy(logits.float(), targets)
        theirs = net(**batch).loss - adapters.regularizer(net)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-4)
    # saved in peft's format and loaded back onto a fresh base: the same model
    net.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(model.load(cfg.model, Path(cfg.paths.cache_dir), 0)[1], tmp_path / "adapter")
    reloaded.eval()
    assert torch.allclose(_logits(reloaded, batch), _logits(net, batch), atol=1e-4)
    # evaluated as deployed: merged into the base where peft can merge the method, else beside it
    served = reloaded
    if adapters.merge_refusal(cfg) is None:
        served = reloaded.merge_and_unload()
        assert not isinstance(served, PeftModel)
        diff = (_logits(served, batch) - _logits(net, batch)).abs().max()
        assert diff < 1e-3 * _logits(net, batch).abs().max(), diff  # float error of merging (logits ~10)
    else:
        assert method in adapters.PROMPT_METHODS
    assert evaluate.decoder_for(served, "fast") == ("hf" if method in adapters.PROMPT_METHODS else "fast")
    scores, rows = evaluate.evaluate(served, tok, eval_ex, cfg.eval, pad, builder.eos_id, 2)
    assert math.isfinite(scores["eval/loss"]) and 0 <= scores["eval/rougeL"] <= 1
    assert scores["eval/loss"] == pytest.approx(evaluate.eval_loss(net, eval_ex, 2, pad), rel=1e-4)
    assert len(rows) == 2 and all(isinstance(r["prediction"], str) for r in rows)


@pytest.mark.parametrize("method", adapters.METHODS)
def test_every_method_trains_with_transformers_trainer(cfg_factory, tmp_path, method):
    """train.engine=hf_trainer: Trainer runs peft's own forward (prompt tokens, AdaLoRA's penalty
    included); the trained adapter beats a fresh one on the training examples."""
    from src import hf_engine

    cfg, tok, base, _, train_ex, _ = _setup(cfg_factory, method, "train.engine=hf_trainer", "train.max_steps=4")
    net = adapters.attach(base, cfg, 4)
    stats = hf_engine.train(net, tok, train_ex, cfg.train, tmp_path / "hf", on_log=lambda row: None)
    assert stats.steps == 4 and len(stats.losses) == 4 and all(math.isfinite(x) for x in stats.losses)
    # 4 steps of 2 examples: at most the 8 longest examples' tokens, virtual tokens not among them
    longest = [len(ex.input_ids) for ex in train_ex]
    assert 0 < stats.tokens <= sum(sorted(longest * 2, reverse=True)[:8])
    pad = int(tok.pad_token_id)
    net.eval()
    assert evaluate.eval_loss(net, train_ex, 2, pad) < evaluate.eval_loss(adapters.attach(
        model.load(cfg.model, Path(cfg.paths.cache_dir), 0)[1], cfg, 4).eval(), train_ex, 2, pad)  # it learnt


@pytest.mark.parametrize("engine", ["loop", "hf_trainer"])
def test_adalora_moves_its_rank_budget_in_both_engines(cfg_factory, tmp_path, engine):
    """Without update_and_allocate after each optimizer step AdaLoRA is plain LoRA with a penalty:
    its budget must have moved (a rank pattern, and ranks masked to zero) by the end of training."""
    cfg, tok, base, _, train_ex, _ = _setup(cfg_factory, "adalora", f"train.engine={engine}",
                                            "adalora.init_r=6", "adalora.target_r=2")
    net = adapters.attach(base, cfg, 8)
    assert net.peft_config["default"].rank_pattern is None
    pad = int(tok.pad_token_id)
    if engine == "loop":
        loop.train(net, train_ex, cfg.train, pad, on_log=lambda row: None)
    else:
        from src import hf_engine

        hf_engine.train(net, tok, train_ex, cfg.train, tmp_path / "hf", on_log=lambda row: None)
    pattern = net.peft_config["default"].rank_pattern
    assert pattern, "AdaLoRA never allocated its budget"
    kept = sum(int(torch.as_tensor(v).sum()) for v in pattern.values())
    assert kept < 6 * len(pattern)  # ranks were taken away
    assert float(adapters.regularizer(net)) > 0  # and its orthogonality penalty is part of our loss


def test_methods_without_a_penalty_or_step_hook_get_none():
    net = torch.nn.Linear(2, 2)
    assert adapters.regularizer(net) == 0.0 and adapters.after_optimizer_step(net) is None
    assert not adapters.is_prompt_learning(net) and adapters.prepended_positions(net) == 0


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["peft=loha", "quant=bnb_nf4"], "peft=loha with quant.method=bnb: peft has no loha layers for bnb"),
    (["peft=oft", "quant=bnb_int8"], "peft has no oft layers for bnb"),
    (["peft=dora", "quant=torchao_int8"], "with quant.method=torchao one of peft=lora,rslora"),
    (["peft=ia3", "ia3.feedforward_modules=[up_proj]"], "ia3.feedforward_modules: ['up_proj'] are not in"),
    (["peft=adalora", "adalora.target_r=32"], "adalora.target_r: 32 is above adalora.init_r=24"),
    (["peft=adalora", "adalora.tinit_ratio=0.5", "adalora.tfinal_ratio=0.5"], "keep their sum below 1"),
    (["peft=lora", "peft.method=ia3"], "ia3: peft.method=ia3 needs its settings"),
    (["peft=vera", "vera.r=0"], "vera.r: must be >= 1"),
    (["peft=prompt_tuning", "prompt_tuning.num_virtual_tokens=0"], "prompt_tuning.num_virtual_tokens: must be >= 1"),
    (["peft=lokr", "lokr.target_modules=[]"], "lokr.target_modules: name at least one module"),
    # a knob of a method not chosen is not read, but still checked: a search may pair it with its method
    (["peft=ia3", "lora.r=0"], "lora.r: must be >= 1"),
    (["peft=prompt_tuning", "quant=torchao_int8"], "prompt_tuning is not supported on torchao's quantized models"),
])
def test_what_peft_cannot_do_is_refused_before_any_work(cfg_factory, overrides, fragment):
    with pytest.raises(ConfigError) as err:
        validate(cfg_factory(*overrides))
    assert fragment in str(err.value)


def test_every_method_pair_with_a_quantized_base_is_decided():
    """Each backend names the methods it takes; every other one is refused with the reason."""
    for backend, allowed in adapters.ON_QUANTIZED.items():
        assert set(allowed) <= set(adapters.METHODS), backend
    q = OmegaConf.create({"method": "bnb", "bits": 4, "quant_type": None, "double_quant": False})
    for method in adapters.METHODS:
        cfg = OmegaConf.create({"peft": {"method": method}, "quant": q})
        assert (adapters.unsupported(cfg) is None) == (method in adapters.ON_QUANTIZED["bnb"])
        refusal = adapters.merge_refusal(cfg)
        assert (refusal is None) == (method in adapters.LORA_FAMILY), (method, refusal)
    plain = OmegaConf.create({"peft": {"method": "ia3"}, "quant": {**q, "method": "none", "bits": 32}})
    assert quant.active(plain.quant) is False and adapters.merge_refusal(plain) is None


@pytest.mark.parametrize("method", adapters.ON_QUANTIZED["bnb"])
def test_each_method_bitsandbytes_takes_trains_on_a_4_bit_base(cfg_factory, tmp_path, method):
    # bitsandbytes' CPU 4-bit kernel packs weights in blocks of 64 inputs: wider than the tiny model's 32
    cfg, tok, _, _, train_ex, _ = _setup(cfg_factory, method, "quant=bnb_nf4", "model.shape.hidden_size=64",
                                         "model.shape.intermediate_size=128", "train.max_steps=3")
    base = quant.load(model.base_folder(cfg.model, Path(cfg.paths.cache_dir), 0, tmp_path / "base"), cfg.quant)
    assert quant.describe(cfg.quant, base)["quantized_layers"] == {"Linear4bit": 2 * 7}
    net = adapters.attach(base, cfg, 3)
    stats = loop.train(net, train_ex, cfg.train, int(tok.pad_token_id), on_log=lambda row: None)
    assert stats.steps == 3 and all(math.isfinite(x) for x in stats.losses)


def test_knobs_of_a_method_not_chosen_compose_and_are_left_out(cfg_factory):
    """A search over peft also sets other methods' knobs: the trial ignores them, its record omits them."""
    from src.train import _study_info

    cfg = cfg_factory("peft=ia3", "lora.r=8", "study.name=s", "study.params=[peft,lora.r]")
    validate(cfg)
    plain = to_plain(cfg)
    assert "ia3" in plain and not set(adapters.SECTIONS) - {"ia3"} & set(plain)
    assert adapters.applies(cfg, "ia3.target_modules") and not adapters.applies(cfg, "lora.r")
    assert adapters.applies(cfg, "train.lr") and adapters.applies(cfg, "peft")
    assert _study_info(cfg, ["peft=ia3", "lora.r=8"]) == {"name": "s", "trial": None, "params": {"peft": "ia3"},
                                                          "ignored_params": {"lora.r": 8}}
    assert "lora" in to_plain(cfg_factory("peft=dora")) and "ia3" not in to_plain(cfg_factory("peft=dora"))


def test_a_sweep_over_methods_through_the_cli(tmp_path, data_root, cache_dir):
    """The methods as a search dimension in the real CLI: each trial records its method, what it
    trained and how it was evaluated; the knob of the method not chosen is left out of the record."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}", "logger=none",
                    f"hydra.sweep.dir={sweep}", "peft=lora,prompt_tuning,adalora", "lora.r=4"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((sweep / str(i) / "result.json").read_text()) for i in range(3)]
    assert [r["status"] for r in records] == ["completed"] * 3
    assert [r["run"]["peft"]["method"] for r in records] == ["lora", "prompt_tuning", "adalora"]
    for r in records:
        assert r["metrics"]["train/trainable_params"] == r["run"]["peft"]["trainable_params"] > 0
        assert r["metrics"]["cost/adapter_mb"] > 0 and (Path(r["trial"]["dir"]) / "adapter").is_dir()
    lora, prompt, adalora = records
    assert lora["run"]["peft"]["settings"]["r"] == 4 and lora["config"]["lora"]["r"] == 4
    assert lora["run"]["eval_model"] == "merged into fp32 base" and lora["run"]["eval_decoder"] == "fast"
    assert "lora" not in prompt["config"] and "prompt_tuning" in prompt["config"]
    assert prompt["run"]["eval_model"].startswith("adapter on fp32 base (prompt_tuning adds virtual tokens")
    assert prompt["run"]["eval_decoder"] == "hf"
    # the virtual tokens are not counted as trained tokens: the same examples, the same count as LoRA's
    assert prompt["metrics"]["train/tokens"] == lora["metrics"]["train/tokens"]
    assert adalora["run"]["eval_model"] == "merged into fp32 base" and "lora" not in adalora["config"]
