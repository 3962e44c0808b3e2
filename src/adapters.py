"""PEFT methods as a search dimension: what each ``peft=`` option builds with peft, which quantized
bases peft can train it on, what it needs each step, and whether it merges into the base for
evaluation. The one module that knows the methods; the loop, the worker and the schema ask it.

Every method's knobs live in their own config section (``lora.`` for LoRA, DoRA and rsLoRA, ``ia3.``,
``loha.``...). All sections exist in every composed config, so a search over ``peft`` can also
search one method's knobs (``peft=choice(lora,ia3) lora.r=choice(8,16)``): a trial ignores the
sections its method does not read, and its record keeps only the one it read (``applied``).
"""

from __future__ import annotations

from typing import Any

# method -> the config section holding its knobs
SECTION = {
    "lora": "lora", "dora": "lora", "rslora": "lora", "ia3": "ia3", "loha": "loha", "lokr": "lokr",
    "vera": "vera", "adalora": "adalora", "oft": "oft", "prompt_tuning": "prompt_tuning",
    "prefix_tuning": "prefix_tuning",
}
METHODS = tuple(SECTION)
SECTIONS = tuple(dict.fromkeys(SECTION.values()))
# Methods that add virtual tokens to the input instead of changing weights: nothing to merge, and the
# decoder body cannot be run on its own (the prompt is added by peft's model around it).
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning")
LORA_FAMILY = ("lora", "dora", "rslora")
# quant.method -> the methods peft 0.21 has layers for on that backend's quantized linears (LoHa,
# LoKr, VeRA and OFT wrap plain nn.Linear only); prompt methods leave the base's layers alone.
ON_QUANTIZED = {
    "bnb": (*LORA_FAMILY, "ia3", "adalora", *PROMPT_METHODS),
    "torchao": ("lora", "rslora"),        # peft's TorchaoLoraLinear has no DoRA
    "ipex": ("lora",),                    # ipex-llm's own QLoRA layers
}


def method(cfg: Any) -> str:
    return str(cfg.peft.method)


def section(cfg: Any) -> str:
    return SECTION[method(cfg)]


def applies(cfg: Any, key: str) -> bool:
    """Whether a config key is read by this trial: any key outside the method sections, and the keys
    of the chosen method's own section (``lora.r`` is ignored when peft=ia3)."""
    head = key.lstrip("+~").split(".", 1)[0]
    return head not in SECTIONS or head == section(cfg)


def applied(plain: dict[Any, Any]) -> dict[Any, Any]:
    """A plain config without the sections of the methods not chosen (the record shows what ran)."""
    chosen = SECTION.get(str((plain.get("peft") or {}).get("method")))
    return {k: v for k, v in plain.items() if k not in SECTIONS or k == chosen}


def unsupported(cfg: Any) -> str | None:
    """Why peft cannot train this method on this base, or None."""
    from src import quant

    m = method(cfg)
    if not quant.active(cfg.quant):
        return None
    backend = str(cfg.quant.method)
    allowed = ON_QUANTIZED.get(backend, ())
    if m in allowed:
        return None
    what = (f"{m} is not supported on {backend}'s quantized models here (they are trained through LoRA only)"
            if m in PROMPT_METHODS else f"peft has no {m} layers for {backend}'s quantized linears")
    return f"{what}; use quant=none, or with quant.method={backend} one of peft={','.join(allowed)}"


def merge_refusal(cfg: Any) -> str | None:
    """Why the trained adapter stays beside the base for evaluation instead of merging into it, or None."""
    from src import quant

    m = method(cfg)
    if m in PROMPT_METHODS:
        return f"{m} adds virtual tokens to the input and changes no weight, so there is nothing to merge"
    if quant.needs_own_python(cfg.quant):
        return "ipex-llm cannot merge LoRA into its low-bit layers"
    if quant.active(cfg.quant) and m not in LORA_FAMILY:
        return f"peft cannot merge {m} into {cfg.quant.method}'s quantized layers"
    return None


def _lora_kwargs(s: Any) -> dict[str, Any]:
    return {"r": int(s.r), "lora_alpha": float(s.alpha) if s.alpha is not None else 2 * int(s.r),
            "lora_dropout": float(s.dropout), "target_modules": list(s.target_modules), "task_type": "CAUSAL_LM"}


def peft_config(cfg: Any, total_steps: int) -> Any:
    """The peft config of the chosen method, from its section; ``total_steps`` schedules AdaLoRA's budget."""
    import peft

    m, s = method(cfg), cfg[section(cfg)]
    if m in LORA_FAMILY:
        return peft.LoraConfig(**_lora_kwargs(s), use_dora=m == "dora", use_rslora=m == "rslora")
    targets = list(s.target_modules) if "target_modules" in s else None
    if m == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=list(s.feedforward_modules),
                              task_type="CAUSAL_LM")
    if m == "loha":
        return peft.LoHaConfig(r=int(s.r), alpha=int(s.alpha), rank_dropout=float(s.rank_dropout),
                               module_dropout=float(s.module_dropout), target_modules=targets, task_type="CAUSAL_LM")
    if m == "lokr":
        return peft.LoKrConfig(r=int(s.r), alpha=int(s.alpha), decompose_factor=int(s.decompose_factor),
                               rank_dropout=float(s.rank_dropout), module_dropout=float(s.module_dropout),
                               target_modules=targets, task_type="CAUSAL_LM")
    if m == "vera":
        return peft.VeraConfig(r=int(s.r), d_initial=float(s.d_initial), vera_dropout=float(s.dropout),
                               target_modules=targets, projection_prng_key=int(cfg.train.seed), task_type="CAUSAL_LM")
    if m == "adalora":
        tinit, tfinal = int(float(s.tinit_ratio) * total_steps), int(float(s.tfinal_ratio) * total_steps)
        if tfinal == 0 and total_steps - tinit >= 2:
            # peft fixes the final ranks at step total_step - tfinal: with tfinal 0 that step never comes
            # (steps count from 0), and the budget would end above target_r
            tfinal = 1
        return peft.AdaLoraConfig(init_r=int(s.init_r), target_r=int(s.target_r), lora_alpha=int(s.alpha),
                                  lora_dropout=float(s.dropout), target_modules=targets,
                                  tinit=tinit, tfinal=tfinal, deltaT=int(s.delta_t),
                                  orth_reg_weight=float(s.orth_reg_weight), total_step=total_steps,
                                  task_type="CAUSAL_LM")
    if m == "oft":
        return peft.OFTConfig(r=0, oft_block_size=int(s.block_size), coft=bool(s.coft), eps=float(s.eps),
                              module_dropout=float(s.module_dropout), target_modules=targets, task_type="CAUSAL_LM")
    if m == "prompt_tuning":
        init = {"random": peft.PromptTuningInit.RANDOM, "sample_vocab": peft.PromptTuningInit.SAMPLE_VOCAB}
        return peft.PromptTuningConfig(num_virtual_tokens=int(s.num_virtual_tokens),
                                       prompt_tuning_init=init[str(s.init)], task_type="CAUSAL_LM")
    if m == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=int(s.num_virtual_tokens),
                                       prefix_projection=bool(s.projection),
                                       encoder_hidden_size=int(s.projection_hidden_size), task_type="CAUSAL_LM")
    raise ValueError(f"peft.method: unknown method '{m}'; choose from {', '.join(METHODS)}")


def attach(model: Any, cfg: Any, total_steps: int) -> Any:
    """The chosen method's adapter on ``model`` (ipex-llm's own QLoRA layers on its low-bit base)."""
    from src import quant

    if quant.needs_own_python(cfg.quant):
        from ipex_llm.transformers.qlora import LoraConfig as IpexLoraConfig
        from ipex_llm.transformers.qlora import get_peft_model as ipex_get_peft_model

        return ipex_get_peft_model(model, IpexLoraConfig(**_lora_kwargs(cfg.lora), training_mode="qlora"))
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg, total_steps))


def describe(model: Any, cfg: Any) -> dict[str, Any]:
    """What the record says about the adapter: method, its knobs as run, trainable parameter count."""
    from omegaconf import OmegaConf

    return {"method": method(cfg), "settings": OmegaConf.to_container(cfg[section(cfg)], resolve=True),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def is_prompt_learning(model: Any) -> bool:
    """A peft model that adds virtual tokens around the base model (prompt or prefix tuning)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def prepended_positions(model: Any) -> int:
    """How many virtual positions peft puts in front of the logits: prompt tuning's virtual tokens;
    prefix tuning adds keys and values, not positions, so 0."""
    if not is_prompt_learning(model):
        return 0
    config = model.active_peft_config
    return 0 if str(getattr(config, "peft_type", "")).endswith("PREFIX_TUNING") else int(config.num_virtual_tokens)


def _adalora(model: Any) -> Any:
    """The AdaLoraModel inside ``model``, or None."""
    base = getattr(model, "base_model", None)
    return base if type(base).__name__ == "AdaLoraModel" else None


def regularizer(model: Any) -> Any:
    """AdaLoRA's orthogonality penalty (0.0 for other methods), for a loss computed outside the
    model's forward. peft's AdaLoraModel adds it only to ``model(**batch).loss``; our loop computes
    the loss on the summary positions itself (loop.target_loss), so this restates that penalty: the
    mean Frobenius distance of P Pᵀ (A) and Qᵀ Q (B) from the identity, times orth_reg_weight."""
    import torch

    adalora = _adalora(model)
    if adalora is None:
        return 0.0
    name = adalora.trainable_adapter_name
    weight = float(adalora.peft_config[name].orth_reg_weight)
    terms = []
    for param_name, p in adalora.model.named_parameters():
        if name not in param_name or not ("lora_A" in param_name or "lora_B" in param_name):
            continue
        cov = p @ p.T if "lora_A" in param_name else p.T @ p
        terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype)))
    return weight * torch.stack(terms).mean() if terms else 0.0


def after_optimizer_step(model: Any) -> Any:
    """What the method needs after each optimizer step and before the gradients are cleared, as a
    function of the step number: AdaLoRA's rank allocation (it reads the gradients); None otherwise."""
    adalora = _adalora(model)
    return None if adalora is None else adalora.update_and_allocate
