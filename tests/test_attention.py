"""qlora's attention function (qlora.attention): transformers' sdpa numbers, K/V repeated per
head, and outputs kept across checkpointing's recompute in the layers that keep matmuls."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from qlora import attention
from qlora.checkpointing import enable_gradient_checkpointing
from qlora.config import LoraConfig
from qlora.lora import add_lora
from qlora.model import decoder_layers, load_model

from test_core import randomize_lora


class _Attn(nn.Module):  # what the attention function reads from transformers' module
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.training = groups, True, True


def _qkv(heads: int, kv_heads: int, tokens: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, tokens, heads, dim, generator=g).to(torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, tokens, kv_heads, dim, generator=g).to(torch.bfloat16).transpose(1, 2)
            for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]  # (B, H, T, D) views of (B, T, H, D), as Llama's


@pytest.mark.parametrize("repeat", [True, False], ids=["kv-repeated", "kv-grouped"])
@pytest.mark.parametrize("heads,kv_heads,tokens,dim", [(4, 2, 24, 16), (9, 3, 512, 64)])
def test_matches_transformers_sdpa(heads, kv_heads, tokens, dim, repeat, monkeypatch):
    """The same outputs as transformers' sdpa (bitwise: the same kernel per head) and the same
    gradients to bf16 rounding (repeated K/V's gradients are summed over each group in another
    order), at a toy size and at SmolLM2-135M's real one (9 heads over 3, 64 wide, 512 tokens)."""
    monkeypatch.setattr(attention, "repeats_kv", lambda *args: repeat)
    grads, outs = [], []
    for fn in (sdpa_attention_forward, attention.qlora_sdpa_forward):
        q, k, v = _qkv(heads, kv_heads, tokens, dim)
        out, _ = fn(_Attn(heads // kv_heads), q, k, v, None, scaling=dim ** -0.5)  # (B, T, H, D)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype))
        outs.append(out)
        grads.append([t.grad.float() for t in (q, k, v)])
    assert outs[0].shape == outs[1].shape == (1, tokens, heads, dim)
    assert torch.equal(outs[0], outs[1])
    for ref, got in zip(*grads):
        assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_kv_is_repeated_only_where_its_heads_split_unevenly_over_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert attention.repeats_kv(1, 9, 3)  # SmolLM2-135M: 3 K/V heads on 2 threads
    assert not attention.repeats_kv(2, 9, 3)  # 6 (batch x K/V heads) split evenly
    assert not attention.repeats_kv(1, 32, 8)  # Llama-3-8B
    assert not attention.repeats_kv(1, 9, 9)  # no grouping: nothing to repeat


def test_masks_and_no_grad_take_transformers_sdpa(monkeypatch):
    """A padding mask or no gradients (generation, evaluation) run transformers' function."""
    used = []
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda *a, **k: used.append(1) or sdpa_attention_forward(*a, **k))
    q, k, v = _qkv(4, 2, 8, 16)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    attention.qlora_sdpa_forward(_Attn(2), q, k, v, mask)
    with torch.no_grad():
        attention.qlora_sdpa_forward(_Attn(2), q, k, v, None)
    assert len(used) == 2
    attention.qlora_sdpa_forward(_Attn(2), q, k, v, None)
    assert len(used) == 2


def test_models_load_with_it(stories):
    assert load_model(stories).config._attn_implementation == attention.NAME


def test_kept_layers_skip_the_attention_recompute(stories, monkeypatch):
    """In the layers that keep their matmul outputs the recompute runs no attention forward;
    gradients stay bitwise those of full recomputation."""
    calls = {"n": 0}
    real = attention._flash_forward

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(attention, "_flash_forward", counting)
    results = {}
    for keep in (0, 2, 99):
        model = load_model(stories)
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.3))
        randomize_lora(model)
        enable_gradient_checkpointing(model, keep_matmul_layers=keep)
        model.train()
        ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(7)
        calls["n"] = 0
        model(ids, labels=ids).loss.backward()
        results[keep] = calls["n"], {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    layers = len(decoder_layers(model))
    assert results[0][0] == 2 * layers  # forward and recompute
    assert results[2][0] == 2 * layers - 2
    assert results[99][0] == layers
    for keep in (2, 99):
        for n, g in results[0][1].items():
            assert torch.equal(g, results[keep][1][n]), (keep, n)
