"""Quantized base weights with LoRA trained on top (QLoRA and friends), as a search dimension.

``quant.method`` picks the library, ``quant.bits`` the width, so a study can sweep bits without
naming a library: bitsandbytes takes 4 (nf4 or fp4, optionally double-quantized) and 8 (LLM.int8);
torchao takes 8 (int8 weight-only; peft trains LoRA on it through its TorchaoLoraLinear); ipex-llm
takes 4 (sym_int4, with its own QLoRA layers), in its own environment (see ``worker_python``); 16 and
32 mean no quantization. A quantized trial loads its base straight into the backend (never as an fp32
model first) and scores its untuned baseline on that quantized base. bitsandbytes quantizes each weight
as the checkpoint is read; torchao converts each layer as it loads, and its layers keep only their int8
weight for backward (src/frozen_linear.py); ipex-llm loads a low-bit copy it converted once, in a
child process (src/lowbit.py).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

# bits -> the quantization types each backend has for them (first: the default).
BNB_TYPES = {4: ("nf4", "fp4"), 8: ("int8",)}
TORCHAO_TYPES = {8: ("int8_weight_only",)}
# Why torchao's 4-bit is refused rather than run (measured on this project's reference machine).
TORCHAO_INT4_NOTE = ("torchao's int4 weight-only needs a CPU kernel package that is not available here, and its "
                     "'intx' int4 stores int8 and saves nothing over quant=torchao_int8")
UNQUANTIZED_BITS = (16, 32)
IPEX_TYPES = {4: ("sym_int4",)}
# ipex-llm types refused, each with what it does on CPU (measured with ipex-llm 2.2.0 on this project's
# reference machine, SmolLM2-135M, LoRA r=16): the first raise inside ipex-llm, the others load and run
# but their LoRA never learns (the training loss stays at its first value).
IPEX_REFUSED = {
    **dict.fromkeys(("nf4", "fp4", "nf3", "fp8", "fp8_e4m3", "fp8_e5m2"),
                    "ipex-llm does not support it on CPU ('NF3, NF4, FP4 and FP8 quantization are currently "
                    "not supported on CPU')"),
    **dict.fromkeys(("sym_int8", "asym_int4"), "its LoRA does not train on CPU (the loss stays constant)"),
}


def active(q: Any) -> bool:
    """Whether the base weights are quantized at all (bits 16/32 keep them in full precision)."""
    return str(q.method) != "none" and int(q.bits) not in UNQUANTIZED_BITS


def resolved_type(q: Any) -> str | None:
    if not active(q):
        return None
    types = {"torchao": TORCHAO_TYPES, "ipex": IPEX_TYPES}.get(str(q.method), BNB_TYPES)
    return str(q.quant_type) if q.quant_type is not None else types[int(q.bits)][0]


def needs_own_python(q: Any) -> bool:
    """ipex-llm does not import with transformers 5: its trials' workers run in their own venv."""
    return str(q.method) == "ipex" and active(q)


def worker_python(q: Any, ipex_python: str) -> str:
    """The interpreter a trial's worker runs with."""
    return ipex_python if needs_own_python(q) else sys.executable


def check(q: Any, errors: list[str], ipex_python: str | None = None) -> None:
    """What the chosen backend cannot do, named with the key and the fix, before any work."""
    method, bits = str(q.method), int(q.bits)
    if method == "none":
        if bits != 32:
            errors.append(f"quant.bits: {bits} needs a quantization backend; choose quant=bnb_nf4 or "
                          "quant=bnb_int8 (or quant.method=bnb), or keep quant.bits=32")
        return
    if method == "bnb":
        if bits not in (*BNB_TYPES, *UNQUANTIZED_BITS):
            errors.append(f"quant.bits: bitsandbytes has 4 and 8 bits (16/32: no quantization), not {bits}")
        elif bits in BNB_TYPES and q.quant_type is not None and q.quant_type not in BNB_TYPES[bits]:
            errors.append(f"quant.quant_type: '{q.quant_type}' is not a {bits}-bit bitsandbytes type; "
                          f"use one of {list(BNB_TYPES[bits])} or null")
        if q.double_quant and bits != 4:
            errors.append("quant.double_quant: only 4-bit bitsandbytes quantizes its scales; set it false")
        if importlib.util.find_spec("bitsandbytes") is None:
            errors.append("quant.method: bitsandbytes is not installed; run `make setup`")
    if method == "torchao":
        if bits == 4:
            errors.append(f"quant.bits: 4 with torchao is refused: {TORCHAO_INT4_NOTE}; use quant=bnb_nf4 for 4 bits")
        elif bits not in (*TORCHAO_TYPES, *UNQUANTIZED_BITS):
            errors.append(f"quant.bits: torchao has 8 bits here (16/32: no quantization), not {bits}")
        elif bits in TORCHAO_TYPES and q.quant_type is not None and q.quant_type not in TORCHAO_TYPES[bits]:
            errors.append(f"quant.quant_type: '{q.quant_type}' is not a torchao type here; use int8_weight_only")
        if importlib.util.find_spec("torchao") is None:
            errors.append("quant.method: torchao is not installed; run `make setup`")
    if method == "ipex":
        _check_ipex(q, bits, errors, ipex_python)
    if method != "bnb" and q.double_quant:  # one message for every backend without quantized scales
        errors.append("quant.double_quant: bitsandbytes 4-bit only; set it false")


def _check_ipex(q: Any, bits: int, errors: list[str], ipex_python: str | None) -> None:
    qtype = None if q.quant_type is None else str(q.quant_type)
    if qtype in IPEX_REFUSED:
        errors.append(f"quant.quant_type: '{qtype}' is refused: {IPEX_REFUSED[qtype]}; use quant=ipex_sym_int4 "
                      "(sym_int4), or quant=bnb_nf4 for NF4 on CPU")
    elif bits not in (*IPEX_TYPES, *UNQUANTIZED_BITS):
        errors.append(f"quant.bits: ipex-llm trains LoRA on 4 bits here (sym_int4; 16/32: no quantization), "
                      f"not {bits}; use quant=bnb_int8 or quant=torchao_int8 for 8 bits")
    elif bits in IPEX_TYPES and qtype is not None and qtype not in IPEX_TYPES[bits]:
        errors.append(f"quant.quant_type: '{qtype}' is not an ipex-llm type this project trains; use sym_int4")
    if not active(q) or ipex_python is None:
        return
    python = Path(ipex_python)
    if not python.exists():
        errors.append(f"paths.ipex_python: '{python}' does not exist; ipex-llm runs in its own environment "
                      "(it does not import with transformers 5): create it with `make ipex-venv`, or point "
                      "PARETUNE_IPEX_PYTHON at an interpreter that has it")
        return
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('ipex_llm') is None)"
    try:
        found = subprocess.run([str(python), "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        found = False
    if not found:
        errors.append(f"paths.ipex_python: '{python}' has no ipex_llm; recreate it with `make ipex-venv`")


def hf_config(q: Any) -> Any:
    """The transformers quantization config for ``from_pretrained``."""
    import torch
    from transformers import BitsAndBytesConfig

    if str(q.method) == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if int(q.bits) == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=resolved_type(q),
                              bnb_4bit_use_double_quant=bool(q.double_quant),
                              bnb_4bit_compute_dtype=torch.float32)


def load(folder: str | Path, q: Any, low_bit_root: Path | None = None) -> Any:
    """The model in ``folder`` with its linear layers quantized, ready for k-bit LoRA training;
    ``low_bit_root``: where ipex-llm keeps its low-bit copies (src/lowbit.py)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from src.model import dtype_kwarg

    if str(q.method) == "ipex":
        return _load_ipex(folder, q, low_bit_root)
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=hf_config(q), device_map="cpu",
                                                 **dtype_kwarg(torch.float32))
    model.config.use_cache = False
    if str(q.method) == "torchao":
        from src.frozen_linear import keep_quantized_for_backward

        keep_quantized_for_backward(model)
    if str(q.method) != "bnb":
        return model
    # Casts norms to fp32 and enables input grads; checkpointing stays train.gradient_checkpointing's call.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _load_ipex(folder: str | Path, q: Any, low_bit_root: Path | None) -> Any:
    from ipex_llm.transformers.qlora import prepare_model_for_kbit_training

    from src import lowbit

    if low_bit_root is None:
        raise ValueError("quant=ipex: give the folder for its low-bit copies (low_bit_root)")
    model = lowbit.load(Path(folder), str(resolved_type(q)), low_bit_root)
    model.config.use_cache = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def describe(q: Any, model: Any) -> dict[str, Any]:
    """What was really quantized: counted from the model's layers, not taken from the config."""
    from src.frozen_linear import is_quantized

    layers: dict[str, int] = {}
    for module in model.modules():
        kind = type(module).__name__
        weight = getattr(module, "weight", None)
        if is_quantized(weight):  # torchao swaps the weight, not the layer
            kind = f"Linear[{type(weight).__name__}]"
        elif kind not in ("Linear4bit", "Linear8bitLt", "LowBitLinear"):
            continue
        layers[kind] = layers.get(kind, 0) + 1
    return {"backend": str(q.method), "bits": int(q.bits), "quant_type": resolved_type(q),
            "double_quant": bool(q.double_quant), "quantized_layers": layers,
            **getattr(model, "low_bit_facts", {})}
