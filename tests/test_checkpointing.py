"""Gradient checkpointing's recompute skips the 4-bit matmul whose output backward never
reads (qlora.checkpointing), and nothing else: gradients equal full recomputation's."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama

from qlora import cpu_matmul, quant
from qlora.checkpointing import enable_gradient_checkpointing
from qlora.config import LoraConfig
from qlora.lora import add_lora
from qlora.model import decoder_layers, load_model

from conftest import write_tiny_model
from test_core import randomize_lora

_CPU_FORWARD = cpu_matmul._cpu_forward  # before any test patches it
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _mlp_with_tail(variant: str):
    """LlamaMLP.forward, with down_proj's output used after the matmul as `variant` says."""
    def forward(self, x):
        y = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # (B, T, hidden)
        if variant == "scaled":  # a scaled branch: value-free in backward too, but only a
            return y * 0.5       # bare sum is recognized, so it is recomputed
        if variant == "post_norm":  # a norm after the MLP (Gemma): backward reads y
            return F.rms_norm(y, (y.shape[-1],))
        if variant == "read_twice":  # y also feeds a product, which saves it
            return y + y * y
        return y
    return forward


def _step(path, checkpointing: bool, monkeypatch, tokens: int = 24):
    """LoRA gradients of one forward/backward, and the 4-bit matmuls each linear kind ran in
    its forward passes (forward plus recompute) over all layers."""
    runs: collections.Counter = collections.Counter()
    kind: dict[int, str] = {}
    def counting(x2, weight, *args, **kwargs):
        runs[kind[weight.data_ptr()]] += 1
        return _CPU_FORWARD(x2, weight, *args, **kwargs)

    monkeypatch.setattr(cpu_matmul, "_cpu_forward", counting)
    model = load_model(path)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    randomize_lora(model)
    for name, m in model.named_modules():
        if isinstance(m, quant.QuantLinear):
            kind[m.weight.data_ptr()] = next(k for k in LINEARS if f".{k}." in f".{name}.")
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return model, grads, runs


@pytest.mark.parametrize("variant", ["llama", "scaled", "post_norm", "read_twice"])
def test_recompute_skips_only_an_unread_down_proj(stories, monkeypatch, variant):
    """In a Llama layer down_proj's output only feeds the residual sum: the recompute skips its
    matmul. Any use of it after the matmul keeps it. Gradients are bitwise those without
    checkpointing either way (the same ops on the same shapes)."""
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", _mlp_with_tail(variant))
    _, plain, plain_runs = _step(stories, False, monkeypatch)
    model, ckpt, runs = _step(stories, True, monkeypatch)
    layers = len(decoder_layers(model))
    assert plain_runs == {k: layers for k in LINEARS}  # one forward pass
    skipped = variant == "llama"
    assert runs == {k: (layers if skipped and k == "down_proj" else 2 * layers) for k in LINEARS}
    flags = {k: {m.unread_in_recompute for n, m in model.named_modules()
                 if isinstance(m, quant.QuantLinear) and f".{k}." in f".{n}."} for k in LINEARS}
    assert flags == {k: {skipped and k == "down_proj"} for k in LINEARS}
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), n


def test_unread_skip_at_a_1p3b_layer_shape(tmp_path, monkeypatch):
    """One decoder layer at the 1.3B widths (hidden 2048, FFN 5504: down_proj's 4-bit matmul
    is two 1024-row tiles here) trains to the same gradients with the skip."""
    monkeypatch.setattr(cpu_matmul, "AMX_TILE_WEIGHTS", 0)
    path = write_tiny_model(tmp_path / "m", dtype=torch.bfloat16, hidden_size=2048,
                            intermediate_size=5504, num_hidden_layers=1, num_attention_heads=16,
                            num_key_value_heads=16, vocab_size=512)
    _, plain, _ = _step(path, False, monkeypatch, tokens=64)
    _, ckpt, runs = _step(path, True, monkeypatch, tokens=64)
    assert runs["down_proj"] == 1 and runs["up_proj"] == 2
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), n
