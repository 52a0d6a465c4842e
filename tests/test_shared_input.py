"""Adapters of projections that read one tensor share their input side (lora.SharedInput):
the same numbers as separate adapters without dropout, one mask with it, and never a wrong
result when a sibling is called with another tensor."""

import copy

import pytest
import torch
from torch import nn

from qlora.config import LoraConfig
from qlora.lora import LoRALinear, add_lora, lora_layers, share_inputs, unshare_inputs

from test_core import randomize_lora


def tiny_llama(dtype=torch.float32, hidden=64, inter=128):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg).to(dtype)


def qkv(width: int, s: LoraConfig) -> nn.Module:
    """An attention-like module: q/k/v adapters on (width -> 32) linears, inputs shared."""
    parent = nn.Module()
    for n in ("q_proj", "k_proj", "v_proj"):
        setattr(parent, n, LoRALinear(nn.Linear(width, 32, bias=False), s))
    assert share_inputs(parent) == 1
    return parent


def grads_of(model, ids, seed=7):
    model.zero_grad()
    torch.manual_seed(seed)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_groups_are_q_k_v_and_gate_up_and_the_switch_turns_them_off():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    layers = lora_layers(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared is not None
    assert attn.o_proj.shared is None and model.model.layers[0].mlp.down_proj.shared is None
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.shared is mlp.up_proj.shared is not attn.q_proj.shared
    assert sum(layer.shared is not None for layer in layers.values()) == 2 * 5
    off = tiny_llama()
    add_lora(off, LoraConfig(r=4, alpha=8, dropout=0.0, fuse_shared_inputs=False))
    assert all(layer.shared is None for layer in lora_layers(off).values())


def test_without_dropout_shared_equals_separate_adapters_in_fp32():
    """One GEMM over stacked A factors = three GEMMs (fp32: to rounding), logits and grads."""
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    randomize_lora(model)
    separate = copy.deepcopy(model)
    unshare_inputs(separate)
    model.train(), separate.train()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, separate(ids).logits, rtol=1e-5, atol=1e-5)
    g1, g2 = grads_of(model, ids), grads_of(separate, ids)
    assert g1.keys() == g2.keys() and len(g1) == 2 * 7 * 2
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)


def test_with_dropout_siblings_see_one_mask(monkeypatch):
    """q/k/v with equal A factors give equal A outputs only when they share the mask."""
    parent = qkv(256, LoraConfig(r=4, alpha=8, dropout=0.3))
    q, k, v = parent.q_proj, parent.k_proj, parent.v_proj
    for m in (k, v):
        m.lora_A.weight.data.copy_(q.lora_A.weight)
        nn.init.normal_(m.lora_B.weight)
    nn.init.normal_(q.lora_B.weight)
    x = torch.randn(3, 5, 256)

    import qlora.lora as lora_module
    seen = []
    real_up = lora_module.lora_up
    monkeypatch.setattr(lora_module, "lora_up", lambda out, a, w: seen.append(a) or real_up(out, a, w))

    def a_side(layer):  # scaling * A(dropout(x)) as B receives it
        layer(x)
        return seen[-1]

    parent.train()
    torch.manual_seed(1)
    shared = [a_side(m) for m in (q, k, v)]
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[0], shared[2])
    # the shared mask is the one a single adapter draws: same generator state, same result
    torch.manual_seed(1)
    unshare_inputs(parent)
    alone = [a_side(m) for m in (q, k, v)]
    torch.testing.assert_close(alone[0], shared[0])
    assert not torch.equal(alone[0], alone[1])  # a mask per projection otherwise


def test_a_sibling_called_with_another_tensor_computes_its_own():
    """Cross-attention style: k and v read other states than q. Their outputs must be what
    separate adapters give (no stale sharing), also after the input is modified in place."""
    parent = qkv(64, LoraConfig(r=4, alpha=8, dropout=0.0))
    for m in lora_layers(parent).values():
        nn.init.normal_(m.lora_B.weight)
    separate = copy.deepcopy(parent)
    unshare_inputs(separate)
    x, enc = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        got = [parent.q_proj(x), parent.k_proj(enc), parent.v_proj(enc)]
        want = [separate.q_proj(x), separate.k_proj(enc), separate.v_proj(enc)]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        parent.q_proj(x)
        x.mul_(2)  # same object, new values: k must not reuse q's A side of the old x
        torch.testing.assert_close(parent.k_proj(x), separate.k_proj(x))


def test_checkpointing_replays_the_shared_masks(stories):
    """With shared masks (the default), checkpointing's recompute must draw the masks the
    forward drew: gradients bitwise equal with and without it, on the 4-bit model."""
    from qlora.checkpointing import enable_gradient_checkpointing
    from qlora.model import load_model
    grads = []
    for checkpointing in (False, True):
        model = load_model(stories)
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.3))
        assert any(isinstance(m, LoRALinear) and m.shared is not None for m in model.modules())
        randomize_lora(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
        grads.append(grads_of(model, ids))
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_at_a_realistic_width_learns_like_separate_adapters(dropout):
    """A 2048-wide bf16 layer pair (the 1.3B shape's width): a few AdamW steps shared and
    separate. Without dropout the losses agree to bf16 rounding; with it both fall."""
    losses = {}
    for fuse in (True, False):
        model = tiny_llama(torch.bfloat16, hidden=2048, inter=5504)
        model.model.layers = model.model.layers[:1]
        model.config.num_hidden_layers = 1
        add_lora(model, LoraConfig(r=16, alpha=32, dropout=dropout, fuse_shared_inputs=fuse))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(3)
        model.train()
        run = []
        for _ in range(4):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses[fuse] = run
    for run in losses.values():
        assert run[-1] < run[0]
    if dropout == 0:
        for a, b in zip(losses[True], losses[False]):
            assert abs(a - b) <= 0.02 * abs(b)
