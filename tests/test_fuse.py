"""One product for the LoRA projections that share an input: the same loss and LoRA gradients as
peft's own forward, groups found by watching the model run, and peft's forward wherever fusing would
not be exact."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from src import fuse, loop
from src.data import Example

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(targets=ALL, dropout=0.0, bias=False):
    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, pad_token_id=0,
                                       attention_bias=bias))
    net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    for name, p in net.named_parameters():  # B starts at zero in peft: give the updates a value to test
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return net


def _batch():
    g = torch.Generator().manual_seed(1)
    examples = []
    for i, n in enumerate((7, 12, 9)):
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        examples.append(Example(str(i), ids[:4], ids[4:], "", False))
    return loop.collate(examples, pad_id=0)


def _probe():
    return {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}


def _loss_and_grads(net, batch):
    net.zero_grad(set_to_none=True)
    loss = loop.target_loss(net, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def _names(net, group):
    names = {id(m): n for n, m in net.named_modules()}
    return [names[id(m)].rsplit(".", 1)[-1] for m in group.members]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_projections_give_peft_loss_and_lora_gradients(bias):
    net, batch = _model(bias=bias), _batch()
    own_forward = {id(m) for m in net.modules() if "forward" in vars(m)}
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    ref_loss, ref_grads = _loss_and_grads(net, batch)
    fused = fuse.apply(net, _probe())
    shared = [m.base_layer.weight for g in fused.groups for m in g.members]
    # each group's weights are rows of one buffer, read in place by its product: no second copy
    assert len({w.untyped_storage().data_ptr() for w in shared}) == len(fused.groups)
    assert all(g._frozen()[0].data_ptr() == g.members[0].base_layer.weight.data_ptr() for g in fused.groups)
    # per block: q/k/v read the normed hidden states, gate/up the normed attention output
    assert [_names(net, g) for g in fused.groups] == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2
    loss, grads = _loss_and_grads(net, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not any(g.broken for g in fused.groups)
    fused.enabled = False   # peft's forward again, switched in place (what bench.ablate interleaves)
    assert _loss_and_grads(net, batch)[0] == pytest.approx(ref_loss, rel=1e-6)
    fused.remove()
    assert {id(m) for m in net.modules() if "forward" in vars(m)} == own_forward
    assert len({w.untyped_storage().data_ptr() for w in shared}) == len(shared)  # own storage again
    for n, p in net.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


def test_gradient_checkpointing_and_training_steps_keep_the_same_result():
    batch = _batch()
    a, b = _model(), _model()
    fuse.apply(b, _probe())
    for net in (a, b):
        net.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.train()
    opt = {id(n): torch.optim.AdamW([p for p in n.parameters() if p.requires_grad], lr=0.05) for n in (a, b)}
    for _ in range(3):
        for net in (a, b):
            _loss_and_grads(net, batch)
            opt[id(net)].step()
    assert _loss_and_grads(b, batch)[0] == pytest.approx(_loss_and_grads(a, batch)[0], rel=1e-5)


def test_projections_that_do_not_share_an_input_are_left_to_peft():
    net = _model(targets=["o_proj", "down_proj", "q_proj"])  # q alone in its group: nothing to fuse
    assert fuse.apply(net, _probe()).groups == []
    dropout = _model(dropout=0.1)  # a dropout mask per layer: fusing would change the result
    assert fuse.apply(dropout, _probe()).layers == 0


def test_a_group_whose_input_turns_out_not_shared_falls_back_for_good():
    net = _model()
    fused = fuse.apply(net, _probe())
    group = fused.groups[0]
    q, k = group.members[:2]
    x, other = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        q(x)                               # the group now waits for k and v with this x
        out = k(other)                     # another tensor: not shared after all
        assert group.broken and not group.active()
        fused.enabled = False
        torch.testing.assert_close(out, k(other))  # what peft's own forward gives


def test_merged_adapters_take_pefts_forward():
    net, batch = _model(), _batch()
    fused = fuse.apply(net, _probe())
    net.eval()
    with torch.no_grad():
        unmerged = net(**batch).logits
        net.merge_adapter()
        assert not any(g.active() for g in fused.groups)
        merged = net(**batch).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_under_bf16_autocast_the_fused_groups_give_pefts_loss_and_gradients():
    """cpu.dtype=bf16 trains under autocast: the fused products run in bf16 as peft's do, so the two
    agree to bf16's precision, and every group ran fused (none fell back)."""
    net, batch = _model(), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(net, batch)
        fused = fuse.apply(net, _probe())
        loss, grads = _loss_and_grads(net, batch)
    assert fused.groups and not any(g.broken for g in fused.groups)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=5e-2, atol=2e-2, msg=name)


def test_a_weight_replaced_after_fusing_is_read_from_its_new_tensor_and_the_buffer_let_go():
    """A safe merge or a cast gives a layer a new weight tensor: the group then concatenates the current
    weights (the right result) and drops the buffer it no longer reads."""
    net, batch = _model(), _batch()
    fused = fuse.apply(net, _probe())
    group = fused.groups[0]
    assert group._buf is not None
    k = group.members[1].base_layer
    with torch.no_grad():
        k.weight.data = k.weight.detach().clone() * 2  # a new tensor, no longer a row of the buffer
    loss = _loss_and_grads(net, batch)[0]
    assert group._buf is None and not group.broken
    fused.enabled = False
    assert _loss_and_grads(net, batch)[0] == pytest.approx(loss, rel=1e-6)  # peft's forward, same weights
