"""Model and tokenizer loading, with the GGUF -> safetensors conversion cached once per machine.

Loading SmolLM2 from its GGUF file dequantizes it (about 20 s); the saved safetensors reload in
about a second with identical weights. The conversion runs under a file lock so that concurrent
workers convert once, and is published by renaming a finished folder (never a half-written one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from src.paths import package_dir, publish

log = logging.getLogger(__name__)


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return major, minor


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before
    (the ipex-llm environment runs transformers 4.47, where ``dtype`` would be taken for a config field)."""
    return {"dtype": dtype} if _transformers_version() >= (4, 56) else {"torch_dtype": dtype}


def _gguf_path(mcfg: Any) -> Path:
    pkg = package_dir(mcfg.gguf_package)
    if pkg is None:
        raise FileNotFoundError(f"model.gguf_package: '{mcfg.gguf_package}' is not installed")
    return pkg / mcfg.gguf_file


def _cache_key(gguf: Path) -> str:
    # Per transformers major version: a tokenizer saved by 5.x names a class 4.x does not have, and the
    # ipex-llm environment runs 4.x on the same cache.
    st = gguf.stat()
    return f"{gguf.stem}-{st.st_size}-transformers{_transformers_version()[0]}"


def converted_gguf_dir(mcfg: Any, cache_dir: Path) -> Path:
    """Folder with the GGUF model as fp32 safetensors + tokenizer (converted on first use)."""
    gguf = _gguf_path(mcfg)

    def build(tmp: Path) -> None:
        log.info("converting %s to safetensors (once per machine, about 30 s)", gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          **dtype_kwarg(torch.float32))
        # transformers 5's save_pretrained refuses while the GGUF quantizer is attached (4.x attaches
        # none); the weights are already fp32.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)

    return publish(build, cache_dir / "models" / _cache_key(gguf))


def gguf_tokenizer_dir(mcfg: Any, cache_dir: Path) -> Path:
    """Folder with only the tokenizer of a GGUF file (what the tiny model needs)."""
    gguf = _gguf_path(mcfg)
    full = cache_dir / "models" / _cache_key(gguf)
    if (full / ".complete").exists():
        return full

    def build(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)

    return publish(build, cache_dir / "tokenizers" / _cache_key(gguf))


def llama_config(shape: Any, tokenizer: Any) -> LlamaConfig:
    """A Llama config from a model shape (model.shape) and the tokenizer it is used with."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size, initializer_range=shape.init_std,
        max_position_embeddings=4096, tie_word_embeddings=bool(shape.get("tie_embeddings", True)),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_model(shape: Any, tokenizer: Any, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(shape, tokenizer))


SYNTHETIC_SHARD_BYTES = 2 * 2**30  # safetensors shards of the synthetic weights, as checkpoints ship them


def synthetic_dir(mcfg: Any, cache_dir: Path) -> Path:
    """Folder with random bf16 weights of ``model.shape`` and SmolLM2's tokenizer, written once per shape.

    Written tensor by tensor into shards from a skeleton on the meta device, so that building a 3B model
    holds one shard (2 GB) at a time, not the model. The values follow Llama's initialisation (normal with
    ``init_std``, norms at one): what speed and memory depend on is the shape, not the values."""
    tok = AutoTokenizer.from_pretrained(gguf_tokenizer_dir(mcfg, cache_dir))
    config = llama_config(mcfg.shape, tok)
    # The weights depend on the shape and the vocabulary only: the same key in every environment, so the
    # ipex-llm one (transformers 4) links the weights the main one wrote instead of writing its own
    shape = {**{k: mcfg.shape[k] for k in mcfg.shape}, "tie_embeddings": config.tie_word_embeddings}
    key = hashlib.sha256(json.dumps({"shape": shape, "vocab": len(tok)}, sort_keys=True).encode()).hexdigest()[:12]
    models = cache_dir / "models"

    def build(tmp: Path) -> None:
        config.save_pretrained(tmp)  # config and tokenizer files as this transformers writes them
        tok.save_pretrained(tmp)
        twin = next((d for d in sorted(models.glob(f"synthetic-{key}-transformers*")) if (d / ".complete").exists()),
                     None)
        if twin is not None:
            for f in [twin / "model.safetensors.index.json", *twin.glob("model-*.safetensors")]:
                os.link(f, tmp / f.name)
            return
        write_random_weights(tmp)

    def write_random_weights(tmp: Path) -> None:
        from safetensors.torch import save_file

        with torch.device("meta"):
            skeleton = LlamaForCausalLM(config)
        names = {n: p.shape for n, p in skeleton.state_dict().items()
                 if not (config.tie_word_embeddings and n == "lm_head.weight")}
        log.info("writing random %s-shaped weights (%.2fB parameters, once per machine)", mcfg.name,
                 sum(math.prod(s) for s in names.values()) / 1e9)
        shards: list[list[str]] = [[]]
        size = 0
        for name, shape in names.items():
            nbytes = 2 * math.prod(shape)
            if shards[-1] and size + nbytes > SYNTHETIC_SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        gen = torch.Generator().manual_seed(0)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: (torch.ones(names[n], dtype=torch.bfloat16) if n.endswith("norm.weight") else
                           (torch.randn(names[n], generator=gen) * float(mcfg.shape.init_std)).to(torch.bfloat16))
                       for n in shard}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            del tensors
        total = sum(2 * math.prod(s) for s in names.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))

    return publish(build, models / f"synthetic-{key}-transformers{_transformers_version()[0]}")


def prepare(mcfg: Any, cache_dir: Path) -> None:
    """Build what loading the model reads from the cache (the GGUF conversion, the synthetic weights, the
    tokenizer), once per machine: a stage of its own, so that a trial's load time is loading only."""
    source = str(mcfg.source)
    if source == "gguf":
        converted_gguf_dir(mcfg, cache_dir)
    elif source == "synthetic":
        synthetic_dir(mcfg, cache_dir)
    elif source == "tiny":
        gguf_tokenizer_dir(mcfg, cache_dir)


def base_folder(mcfg: Any, cache_dir: Path, seed: int, scratch: Path) -> Path:
    """A folder ``from_pretrained`` can load the base model from (what quantized loading needs);
    the tiny model, built in code, is saved to ``scratch`` first."""
    source = str(mcfg.source)
    if source == "gguf":
        return converted_gguf_dir(mcfg, cache_dir)
    if source == "hf":
        return Path(mcfg.path)
    if source == "synthetic":
        return synthetic_dir(mcfg, cache_dir)
    tok = AutoTokenizer.from_pretrained(gguf_tokenizer_dir(mcfg, cache_dir))
    tiny_model(mcfg.shape, tok, seed).save_pretrained(scratch)
    tok.save_pretrained(scratch)
    return scratch


def load_tokenizer(mcfg: Any, cache_dir: Path) -> Any:
    """The model's tokenizer alone (what a quantized trial needs before its base loads quantized)."""
    source = str(mcfg.source)
    if source == "gguf":
        tok = AutoTokenizer.from_pretrained(converted_gguf_dir(mcfg, cache_dir))
    elif source == "hf":
        tok = AutoTokenizer.from_pretrained(mcfg.path, local_files_only=not mcfg.allow_download)
    else:  # tiny, synthetic: SmolLM2's
        tok = AutoTokenizer.from_pretrained(gguf_tokenizer_dir(mcfg, cache_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


SYNTHETIC_NOTE = "synthetic: speed and memory only"  # in every record and report of a synthetic model


def origin(mcfg: Any) -> str:
    source = str(mcfg.source)
    return {"gguf": lambda: str(_gguf_path(mcfg)), "hf": lambda: str(mcfg.path),
            "tiny": lambda: "built in code",
            "synthetic": lambda: f"random weights, {mcfg.name} shape"}[source]()


def architecture_params(model: Any) -> int:
    """Parameters as the architecture has them, whatever stores them: a quantized linear layer counts
    in x out (+ bias) although it packs two 4-bit weights a byte (bitsandbytes, ipex-llm); a weight
    shared by two modules (tied embeddings) counts once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        weight = getattr(module, "weight", None)
        if hasattr(module, "in_features") and any(p is weight for p in own):
            total += int(module.in_features) * int(module.out_features) + sum(p.numel() for p in own if p is not weight)
        else:
            total += sum(p.numel() for p in own)
    return total


def facts(mcfg: Any, tok: Any, model: Any) -> dict[str, Any]:
    """What was loaded, for result.json. Parameters are counted as the architecture has them (a 4-bit
    layer stores two weights a byte; transformers' count undoes that)."""
    first = next(model.parameters())
    out = {"name": mcfg.name, "origin": origin(mcfg), "n_params": architecture_params(model),
           "dtype": str(first.dtype).replace("torch.", ""), "vocab_size": len(tok)}
    if str(mcfg.source) == "synthetic":
        out["synthetic"] = SYNTHETIC_NOTE
    return out


def load(mcfg: Any, cache_dir: Path, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """Tokenizer, fp32 model and facts about what was loaded (for result.json)."""
    source = str(mcfg.source)
    tok = load_tokenizer(mcfg, cache_dir)
    model: Any
    if source == "tiny":  # built in code: no folder to load from
        model = tiny_model(mcfg.shape, tok, seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(base_folder(mcfg, cache_dir, seed, Path())), local_files_only=source != "hf" or not mcfg.allow_download,
            **dtype_kwarg(torch.float32))
    model.config.use_cache = False
    return tok, model, facts(mcfg, tok, model)
