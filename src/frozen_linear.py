"""Frozen quantized linear layers that keep only their quantized weight for the backward pass.

torchao's int8 weight-only linear computes ``x @ int8.to(fp32).t() * scale``. Autograd saves that fp32
copy of the weight for the input's gradient, so a training step held every adapted layer's weight in
fp32 beside its int8 one until backward (measured on the scaling study: torchao trials peaked at
1.03-1.12x the fp32 trial's). peft trains LoRA beside these layers and the base weights are frozen,
so backward only needs the input's gradient: this runs torchao's own forward kernel without autograd
and, in backward, computes the input's gradient from the int8 weight, one layer at a time. It
replaces only autograd's bookkeeping for these layers, which torchao does not offer a switch for.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


class FrozenQuantizedLinear(torch.autograd.Function):
    """``linear(x, weight, bias)`` for a frozen quantized ``weight`` (and a frozen bias): saves the weight
    as stored. Autocast is applied as torch's own linear would be, in forward and backward alike."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # the quantized parameter itself: nothing is copied
        return F.linear(x, weight, bias)  # a Function's forward records no graph of its own

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if ctx.needs_input_grad[2]:
            raise RuntimeError("a quantized layer's bias is frozen here: train it outside the quantized layer")
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return input_grad(grad, ctx.weight), None, None


def input_grad(grad: torch.Tensor, weight: Any) -> torch.Tensor:
    """``grad @ W`` for a quantized ``W``. With one scale per output row and no zero point (torchao's int8
    weight-only default) W = int8 * scale, so this is (grad * scale) @ int8: the scale goes on the small
    gradient instead of the weight (measured: 82 ms against 122 ms through dequantize() for a 8192x2048
    weight and 512 tokens, where the fp32 product alone takes 62). Any other layout is dequantized."""
    if _per_row_symmetric(weight):
        return (grad * weight.scale.reshape(-1).to(grad.dtype)) @ weight.qdata.to(grad.dtype)
    return grad @ weight.dequantize().to(grad.dtype)


def _per_row_symmetric(weight: Any) -> bool:
    """One scale per output row and a zero point of zeros (torchao stores one even when symmetric)."""
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if qdata is None or scale is None or qdata.ndim != 2:
        return False
    if list(getattr(weight, "block_size", [])) != [1, qdata.shape[1]]:
        return False
    zero = getattr(weight, "zero_point", None)
    return zero is None or not bool(torch.count_nonzero(zero))


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return FrozenQuantizedLinear.apply(x, self.weight, self.bias)


def is_quantized(weight: Any) -> bool:
    """A weight torchao has swapped for its own tensor type (it swaps the weight, not the layer)."""
    return type(weight).__module__.startswith("torchao")


def keep_quantized_for_backward(model: torch.nn.Module) -> int:
    """Every linear layer of ``model`` with a torchao weight keeps only that weight for backward; returns
    how many it changed. Those weights get no gradient: peft freezes them (an int8 weight cannot train)."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and is_quantized(module.weight):
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]
            changed += 1
    return changed
