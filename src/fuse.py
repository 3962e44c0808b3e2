"""One matrix product for the LoRA-adapted projections that read the same input.

In a Llama-shaped block, q/k/v read the same hidden states, and so do gate/up. peft runs each adapted
projection on its own: per layer and micro-batch, 5 frozen products and 5 skinny LoRA down-projections
(rank r against the hidden size) forward, as many input-gradient products backward, and 5 weight
gradients of the down-projections. Here the frozen weights of a group are concatenated once (they do
not change while training) and the group's down-projections per call, so each group costs one
frozen product and one down-projection forward, one input gradient each backward and one weight
gradient: fewer, larger products, which a CPU runs closer to its peak.

Which projections share an input is found by running the model once on a short input and watching
which adapted layers receive the very same tensor: no module names are assumed, so any causal LM
works, and a layer whose input turns out not to be shared at run time falls back to peft's own
forward for good. Each member adds its scaled LoRA update to its frozen output in one addmm, not in
peft's product, scaling and sum. The group's frozen weights are moved into one buffer, each layer's
weight a view of its rows, so the group's product needs no copy of them. The result equals peft's
within float tolerance (tested); layers peft adapts in other ways (dropout, DoRA and other variants,
quantized bases, merged or disabled adapters) always take peft's forward.

Measured with ``python -m bench.ablate`` (README, Speed), against peft's layers: 1.15x the tokens/s
on an Intel Xeon with AVX-512 under tcmalloc (as trials run), 1.05x and 1.10x under glibc; nothing
gained or lost on an AMD EPYC with AVX2 (before the addmm and the buffer). Layers that share their
input with no other (o_proj, down_proj) were also tried as groups of one, for the single addmm
alone: no gain measured (1.09x against 1.10x for the shared groups alone, in one run under glibc),
so they keep peft's forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


def _plain_lora(layer: Any) -> bool:
    """A peft LoRA Linear with one adapter, no dropout and no variant, on a float nn.Linear."""
    from peft.tuners.lora import Linear

    if type(layer) is not Linear:  # subclasses (quantized bases) compute differently
        return False
    active = list(layer.active_adapters)
    if len(active) != 1 or layer.merged or layer.disable_adapters:
        return False
    name = active[0]
    base = layer.base_layer
    return (type(base) is torch.nn.Linear and name in layer.lora_A and name not in layer.lora_variant
            and isinstance(layer.lora_dropout[name], torch.nn.Identity) and not base.weight.requires_grad
            and base.weight.dtype == layer.lora_A[name].weight.dtype and base.weight.is_floating_point())


@dataclass(eq=False)
class Group:
    """Adapted layers that receive the same input tensor, in call order."""
    members: list[Any]
    enabled: bool = True
    broken: bool = False              # an input was not shared after all: peft's forward from now on
    _x: Any = None
    _out: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    _left: set[int] = field(default_factory=set)
    _wkey: Any = None
    _w: Any = None
    _b: Any = None
    _buf: Any = None                  # the members' weights, one buffer (adopt)

    def adopt(self) -> None:
        """Move the members' frozen weights into one buffer, each weight a view of its rows: the group's
        product then reads them in place. Without this the group held a concatenated copy, a second
        copy of most of the model's weights (about 7 GB for a 3B model in fp32)."""
        weights = [m.base_layer.weight for m in self.members]
        if len({(w.dtype, w.device) for w in weights}) > 1:
            return
        buf = torch.cat([w.detach() for w in weights])
        start = 0
        for w in weights:
            w.data = buf[start:start + w.shape[0]]
            start += w.shape[0]
        self._buf = buf

    def release(self) -> None:
        """Each member's weight in storage of its own again (a saved model must not find them sharing one)."""
        if self._buf is None:
            return
        for m in self.members:
            if m.base_layer.weight.untyped_storage().data_ptr() == self._buf.untyped_storage().data_ptr():
                m.base_layer.weight.data = m.base_layer.weight.detach().clone()
        self._buf, self._w, self._wkey = None, None, None

    def _adopted(self) -> bool:
        """The members' weights are still the buffer's rows, in order (nothing replaced them since)."""
        if self._buf is None:
            return False
        ptr, size = self._buf.data_ptr(), self._buf.element_size()
        offset = 0
        for m in self.members:
            w = m.base_layer.weight
            if w.data_ptr() != ptr + offset * size or not w.is_contiguous():
                return False
            offset += w.numel()
        return True

    def _frozen(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The members' frozen weights side by side: the shared buffer (adopt) while the weights are its
        rows, else a concatenated copy; rebuilt only when a weight or bias changed."""
        bases = [m.base_layer for m in self.members]
        adopted = self._adopted()
        if not adopted:
            self._buf = None  # a weight was replaced (a safe merge, a cast): the buffer would be a dead copy
        weights = "adopted" if adopted else tuple((b.weight.data_ptr(), b.weight._version) for b in bases)
        key = (weights, tuple(None if b.bias is None else (b.bias.data_ptr(), b.bias._version) for b in bases))
        if key != self._wkey:
            self._w = self._buf if adopted else torch.cat([b.weight.detach() for b in bases])
            # one bias vector when any member has a bias (zeros for those without), else none
            self._b = None if all(b.bias is None for b in bases) else torch.cat(
                [b.weight.new_zeros(b.out_features) if b.bias is None else b.bias.detach() for b in bases])
            self._wkey = key
        return self._w, self._b

    def active(self) -> bool:
        return self.enabled and not self.broken and all(_plain_lora(m) for m in self.members)

    def output(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Member i's frozen output and down-projection for input x, computed for the whole group on
        the first member's call; None when x is not the group's pending input (not shared)."""
        if self._left and self._x is not x:
            self.broken = True  # a member saw another tensor while the group waited: not a shared input
            self._x, self._out, self._left = None, None, set()
            return None
        if not self._left:
            w, b = self._frozen()
            downs = [m.lora_A[m.active_adapters[0]] for m in self.members]
            base = F.linear(x, w, b).split([m.base_layer.out_features for m in self.members], dim=-1)
            down = F.linear(x, torch.cat([d.weight for d in downs])).split([d.out_features for d in downs], dim=-1)
            self._x, self._out, self._left = x, list(zip(base, down, strict=True)), set(range(len(self.members)))
        assert self._out is not None
        out = self._out[i]
        self._left.discard(i)
        if not self._left:
            self._x, self._out = None, None  # the group's outputs belong to autograd now
        return out


def _patched(layer: Any, group: Group, i: int) -> Any:
    original = layer.forward  # peft's, bound to this layer

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not group.active():
            return original(x, *args, **kwargs)
        got = group.output(i, x)
        if got is None:
            return original(x, *args, **kwargs)
        base, down = got
        name = layer.active_adapters[0]
        up = layer.lora_B[name]
        if isinstance(up, torch.nn.Linear) and up.bias is None:
            # base + scaling * down @ B^T as one addmm: peft's separate product, scaling and sum are
            # three passes over the output forward (and a scaling backward) for every adapted layer
            out = torch.addmm(base.reshape(-1, base.shape[-1]), down.reshape(-1, down.shape[-1]), up.weight.t(),
                              alpha=layer.scaling[name])
            return out.view(*base.shape[:-1], out.shape[-1]).to(base.dtype)
        return (base + up(down) * layer.scaling[name]).to(base.dtype)

    return forward


@dataclass
class Fused:
    """The groups found; ``enabled`` switches every group between the fused and peft's forward."""
    groups: list[Group]
    originals: dict[int, tuple[Any, Any]]

    @property
    def enabled(self) -> bool:
        return any(g.enabled for g in self.groups)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        for g in self.groups:
            g.enabled = value

    @property
    def layers(self) -> int:
        return sum(len(g.members) for g in self.groups)

    def remove(self) -> None:
        """peft's own forward back on every patched layer, each weight in its own storage again."""
        for g in self.groups:
            g.release()
        for layer, forward in self.originals.values():
            if forward is None:
                del layer.forward  # the class's forward again
            else:
                layer.forward = forward
        self.groups, self.originals = [], {}


@torch.no_grad()
def _shared_inputs(model: Any, layers: list[Any], probe: dict[str, torch.Tensor]) -> list[list[Any]]:
    """Run the model once and group the layers that received the identical input tensor."""
    seen: list[tuple[Any, Any]] = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0] if args else None)))
             for layer in layers]
    try:
        was_training = model.training
        model.eval()
        model(**probe)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[Any]] = []
    for mod, x in seen:
        if x is None:
            continue
        for g in groups:
            if g[0][1] is x and all(m is not mod for m, _ in g):
                g.append((mod, x))
                break
        else:
            groups.append([(mod, x)])
    return [[m for m, _ in g] for g in groups if len(g) > 1]


def apply(model: Any, probe: dict[str, torch.Tensor]) -> Fused:
    """Fuse the model's plain LoRA layers that share inputs (found by running ``probe``, a short
    batch of input_ids and attention_mask). A model with none gets an empty ``Fused``: nothing changes."""
    layers = [m for m in model.modules() if _plain_lora(m)]
    fused = Fused([], {})
    if not layers:
        return fused
    for members in _shared_inputs(model, layers, probe):
        group = Group(members)
        group.adopt()
        for i, layer in enumerate(members):
            fused.originals[id(layer)] = (layer, vars(layer).get("forward"))
            layer.forward = _patched(layer, group, i)
        fused.groups.append(group)
    return fused


def apply_on(model: Any, input_ids: list[int]) -> Fused:
    """``apply`` with a probe of the first 8 tokens of ``input_ids`` (a training example's)."""
    ids = torch.tensor([input_ids[:8]])
    return apply(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
