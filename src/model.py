"""Model and tokenizer loading, with the GGUF -> safetensors conversion cached once per machine.

Loading SmolLM2 from its GGUF file dequantizes it (about 20 s); the saved safetensors reload in
about a second with identical weights. The conversion runs under a file lock so that concurrent
workers convert once, and is published by renaming a finished folder (never a half-written one).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from src.paths import package_dir

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


def _publish(build_dir_fn: Any, dest: Path) -> Path:
    """Build into a temp folder beside ``dest`` and rename it into place, once, under a lock."""
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / ".complete").exists():
            return dest
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            build_dir_fn(tmp)
            (tmp / ".complete").touch()
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


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

    return _publish(build, cache_dir / "models" / _cache_key(gguf))


def gguf_tokenizer_dir(mcfg: Any, cache_dir: Path) -> Path:
    """Folder with only the tokenizer of a GGUF file (what the tiny model needs)."""
    gguf = _gguf_path(mcfg)
    full = cache_dir / "models" / _cache_key(gguf)
    if (full / ".complete").exists():
        return full

    def build(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)

    return _publish(build, cache_dir / "tokenizers" / _cache_key(gguf))


def tiny_model(shape: Any, tokenizer: Any, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size, initializer_range=shape.init_std,
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def base_folder(mcfg: Any, cache_dir: Path, seed: int, scratch: Path) -> Path:
    """A folder ``from_pretrained`` can load the base model from (what quantized loading needs);
    the tiny model, built in code, is saved to ``scratch`` first."""
    source = str(mcfg.source)
    if source == "gguf":
        return converted_gguf_dir(mcfg, cache_dir)
    if source == "hf":
        return Path(mcfg.path)
    tok = AutoTokenizer.from_pretrained(gguf_tokenizer_dir(mcfg, cache_dir))
    tiny_model(mcfg.shape, tok, seed).save_pretrained(scratch)
    tok.save_pretrained(scratch)
    return scratch


def load(mcfg: Any, cache_dir: Path, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """Tokenizer, fp32 model and facts about what was loaded (for result.json)."""
    source = str(mcfg.source)
    model: Any
    if source == "gguf":
        folder = converted_gguf_dir(mcfg, cache_dir)
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **dtype_kwarg(torch.float32))
        origin = str(_gguf_path(mcfg))
    elif source == "tiny":
        tok = AutoTokenizer.from_pretrained(gguf_tokenizer_dir(mcfg, cache_dir))
        model = tiny_model(mcfg.shape, tok, seed)
        origin = "built in code"
    elif source == "hf":
        local_only = not mcfg.allow_download
        tok = AutoTokenizer.from_pretrained(mcfg.path, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(mcfg.path, local_files_only=local_only,
                                                     **dtype_kwarg(torch.float32))
        origin = str(mcfg.path)
    else:  # the schema's enum makes this unreachable
        raise ValueError(f"model.source: unknown '{source}'")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.use_cache = False
    facts = {"name": mcfg.name, "origin": origin, "n_params": sum(p.numel() for p in model.parameters()),
             "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
             "vocab_size": len(tok)}
    return tok, model, facts
