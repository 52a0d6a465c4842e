"""The core of QLoRA, checked against references no one here wrote: transformers +
BitsAndBytesConfig for the 4-bit base, plain PyTorch math for LoRA, PEFT for adapters."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora import cpu_matmul, quant
from qlora.adapter import load_adapter, save_adapter
from qlora.errors import QloraError
from qlora.config import LoraConfig
from qlora.lora import LoRALinear, add_lora, lora_layers, trainable_report
from qlora.checkpointing import enable_gradient_checkpointing
from qlora.model import load_model

from conftest import python_path, write_tiny_model


def reference_4bit(path, **kw):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16, **kw)
    # train() (dropout is 0) keeps bitsandbytes off its CPU eval-only repacking path, which
    # asserts out_features % 32 == 0 and stories260K's FFN is 172 wide.
    return model.train()


def fp32_twin(model):
    """A copy of a qlora model with each 4-bit base replaced by its dequantized weight and
    everything in fp32: the numbers a bf16 forward approximates."""
    twin = copy.deepcopy(model)
    for layer in lora_layers(twin).values():
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
        linear.weight.data = quant.dequantize(layer.base_layer).float()
        layer.base_layer = linear
    return twin.float()


def assert_agrees_with_peft(ours, peft, exact):
    """Ours and PEFT's bf16 logits each carry their own rounding (PEFT rounds the base output
    before adding the adapter's; ours adds B's GEMM inside the 4-bit matmul's tiles), so
    both are held against the fp32 twin: ours no noisier than PEFT, and the two within
    twice PEFT's own error of each other."""
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(ours - exact) <= 1.25 * rms(peft - exact), (rms(ours - exact), rms(peft - exact))
    assert rms(ours - peft) <= 2 * rms(peft - exact), (rms(ours - peft), rms(peft - exact))


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_streaming_load_equals_transformers_bnb(stories):
    ours = load_model(stories)
    ref = reference_4bit(stories)
    ours_q = {n: m for n, m in ours.named_modules() if isinstance(m, quant.Linear4bit)}
    ref_q = {n: m for n, m in ref.named_modules() if isinstance(m, quant.Linear4bit)}
    assert ours_q.keys() == ref_q.keys() and len(ours_q) == 5 * 7
    for name, layer in ours_q.items():
        assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested  # double quant
        assert layer.weight.quant_state.blocksize == 64 and layer.compute_dtype == torch.bfloat16
        assert torch.equal(quant.dequantize(layer), quant.dequantize(ref_q[name])), name
    # Nothing frozen is fp32: embeddings, norms and head are bf16.
    for name, p in ours.named_parameters():
        if not isinstance(p, quant.Params4bit):
            assert p.dtype == torch.bfloat16, name
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), ref(ids).logits.float()
    assert (a - b).abs().max() <= 0.02 * b.abs().max()


def test_sharded_fp16_and_bf16_sources_load(tmp_path):
    for dtype in (torch.float16, torch.bfloat16):
        path = write_tiny_model(tmp_path / str(dtype), shards=3, dtype=dtype)
        assert (path / "model.safetensors.index.json").exists()
        model = load_model(path)
        ref = reference_4bit(path)
        ids = torch.arange(40).view(1, 40)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)


def test_sixteen_bit_base_keeps_plain_linears(tiny_model):
    model = load_model(tiny_model, quantization="none")
    assert not any(isinstance(m, quant.Linear4bit) for m in model.modules())
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_tiled_quantization_equals_bitsandbytes(quant_type, double_quant):
    """Quantizing 512 rows at a time must give bitsandbytes' codes and (nested) scales."""
    import bitsandbytes as bnb
    w = torch.randn(1100, 172, generator=torch.Generator().manual_seed(0)).bfloat16()  # 3 tiles
    p1, s1 = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant,
                                          quant_type=quant_type, quant_storage=torch.uint8)
    p2, s2 = quant.quantize_4bit(w, quant_type, double_quant)
    assert p1.shape == p2.shape and torch.equal(p1, p2)
    d1, d2 = s1.as_dict(packed=True), s2.as_dict(packed=True)
    assert d1.keys() == d2.keys() and all(torch.equal(d1[k], d2[k]) for k in d1)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("in_features,tile_rows", [(172, 64), (256, 64), (171, 64), (256, 512)])
def test_tiled_4bit_matmul_equals_bitsandbytes(monkeypatch, quant_type, double_quant, in_features, tile_rows):
    """Our CPU 4-bit matmul dequantizes tiles (into one buffer through bitsandbytes' native
    kernel; odd widths through its op); forward must be bitwise bitsandbytes', backward
    bitwise `grad @ W` with column tiles (one tile: the same GEMM as `grad @ W`), and up
    to bf16 rounding of the partial sums with the row tiles that widths of partial blocks
    per row take."""
    import bitsandbytes as bnb
    native = cpu_matmul._cpu_dequantize_kernel(quant_type, torch.bfloat16, in_features, 64)
    assert (native is None) == (in_features % 2 == 1)  # this bitsandbytes build has it
    monkeypatch.setattr(cpu_matmul, "TILE_ROWS", tile_rows)  # 64: 5 tiles, the last one partial
    monkeypatch.setattr(cpu_matmul, "AMX_TILE_WEIGHTS", 0)
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(in_features, 300, bias=True, dtype=torch.bfloat16)
    layer = quant.empty_quant_linear(linear, quant_type, double_quant, torch.bfloat16)
    quant.set_quantized_weight(layer, torch.randn(300, in_features, generator=g), torch.device("cpu"),
                               torch.bfloat16)
    layer.bias = torch.nn.Parameter(torch.randn(300, generator=g).bfloat16(), requires_grad=False)
    x = torch.randn(2, 7, in_features, generator=g).bfloat16().requires_grad_()
    y = layer(x)
    w = layer.weight
    ref = bnb.matmul_4bit(x.detach(), w.t(), bias=layer.bias, quant_state=w.quant_state)
    assert y.shape == (2, 7, 300) and torch.equal(y, ref)
    grad = torch.randn(2, 7, 300, generator=g).bfloat16()
    y.backward(grad)
    expected = (grad.float() @ quant.dequantize(layer).float())  # (2, 7, in)
    assert (x.grad.float() - expected).abs().max() <= 0.02 * expected.abs().max()
    if in_features % 64 == 0:
        # Whole blocks per row: column tiles, each a full-depth GEMM, as accurate as
        # bitsandbytes' one `grad @ dequantize(W)` (row tiles' bf16 partial sums are 2.5-7x
        # worse). Not bitwise: oneDNN's AMX kernels round differently by GEMM shape, and even
        # their fp32 GEMM is off by ~1 bf16 ulp, so the exact product is taken in float64.
        w = quant.dequantize(layer)
        exact = grad.double() @ w.double()
        ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)  # of bf16
        tiles = (x.grad.double() - exact).abs() / ulp
        whole = ((grad @ w).double() - exact).abs() / ulp
        assert tiles.max() <= 2 and tiles.mean() <= 1.1 * whole.mean(), (tiles.max(), tiles.mean(), whole.mean())
        if tile_rows >= in_features:  # one column tile, read in place: W's own GEMM
            assert torch.equal(x.grad, grad @ w)


@pytest.mark.parametrize("amx_tile_weights", [0, 2048 * 2048])
@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float32])
def test_adapter_inside_the_4bit_tiles_at_a_1p3b_mlp_shape(monkeypatch, factor_dtype, amx_tile_weights):
    """B's GEMM rides in the 4-bit matmul's row tiles (cpu_matmul._cpu_forward): at a 1.3B
    gate_proj shape (5504 x 2048: five 1024-row tiles and a 384-row one, or two 2048-row
    tiles and a 1408-row one, as AMX CPUs run it) the output is the plain
    `x W^T + a B^T` no less accurately than a separate B GEMM and sum (lora.lora_up), and the
    gradients of x, a and B are the plain products."""
    from qlora.lora import lora_up
    monkeypatch.setattr(cpu_matmul, "AMX_TILE_WEIGHTS", amx_tile_weights)
    g = torch.Generator().manual_seed(0)
    n, k, r = 5504, 2048, 16
    layer = quant.empty_quant_linear(torch.nn.Linear(k, n, bias=False), "nf4", True, torch.bfloat16)
    quant.set_quantized_weight(layer, torch.randn(n, k, generator=g) * 0.02, torch.device("cpu"), torch.bfloat16)
    x = torch.randn(2, 32, k, generator=g).bfloat16().requires_grad_()
    a = (torch.randn(2, 32, r, generator=g) * 0.5).to(factor_dtype).requires_grad_()
    B = (torch.randn(n, r, generator=g) * 0.05).to(factor_dtype).requires_grad_()
    y = layer(x, lora=(a, B))  # (2, 32, n)
    W = quant.dequantize(layer).double()
    exact = x.double() @ W.T + a.double() @ B.double().T
    with torch.no_grad():
        separate = lora_up(layer(x), a, B)
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    assert y.dtype == torch.bfloat16 and y.shape == (2, 32, n)
    assert rms(y.double() - exact) <= 1.1 * rms(separate.double() - exact)
    grad = torch.randn(2, 32, n, generator=g).bfloat16()
    y.backward(grad)
    gd = grad.double()
    for got, want in ((x.grad, gd @ W), (a.grad, gd @ B.double()),
                      (B.grad, gd.reshape(-1, n).T @ a.double().reshape(-1, r))):
        assert got.dtype == (torch.bfloat16 if got is x.grad else factor_dtype)
        tol = 2**-7 if got.dtype == torch.bfloat16 else 1e-5  # bf16 rounding / fp32 sums
        assert (got.double() - want).abs().max() <= tol * want.abs().max(), (got.dtype, got.shape)


def test_lora_forward_equals_plain_math(stories):
    model = load_model(stories)
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0))
    randomize_lora(model)
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
    w = quant.dequantize(layer.base_layer).float()  # (out, in)
    A, B = layer.lora_A.weight.float(), layer.lora_B.weight.float()
    expected = x.float() @ w.T + (16 / 8) * (x.float() @ A.T @ B.T)
    got = layer(x).float()
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()  # bf16 noise
    # rsLoRA scales by alpha / sqrt(r)
    assert LoraConfig(r=16, alpha=8, rslora=True).scaling == 2.0
    assert layer.scaling == LoraConfig(r=8, alpha=16).scaling == 2.0


def test_lora_dropout_is_inverted_dropout_on_the_adapter_input():
    from qlora.lora import drop_unscaled
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, dtype=torch.bfloat16)
    kept = drop_unscaled(x, 0.05)
    assert set(kept.unique().tolist()) == {0.0, 1.0}
    assert abs((kept == 0).float().mean().item() - 0.05) < 0.002  # 1e6 draws: sd ~0.0002
    assert abs((drop_unscaled(x, 0.5) == 0).float().mean().item() - 0.5) < 0.002

    # A mask is one draw per seed whatever the thread count: the lanes of the seed's child
    # streams, in order, compared with the threshold; its streams differ.
    import numpy as np
    from qlora.lora import MASK_STREAM_WORDS, keep_mask
    n, lanes = 8 * MASK_STREAM_WORDS + 3, 4 * MASK_STREAM_WORDS  # two whole streams, a ragged third
    words = [np.random.PCG64DXSM(s).random_raw(w) for s, w in
             zip(np.random.SeedSequence(7).spawn(3), (MASK_STREAM_WORDS, MASK_STREAM_WORDS, 1))]
    expected = torch.from_numpy(np.concatenate(words).view(np.int16)[:n] >= round(0.3 * 65536) - 32768)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(keep_mask(7, n, 0.3), expected), t
        assert keep_mask(7, n, 0.0).all()
        for dtype in (torch.bfloat16, torch.float16, torch.float32):  # what multiplies the input
            got = keep_mask(7, n, 0.3, dtype)
            assert got.dtype == dtype and torch.equal(got, expected.to(dtype)), dtype
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(expected[:lanes], expected[lanes:2 * lanes])
    assert abs(expected.float().mean().item() - 0.7) < 0.003

    # training-mode output = base + (alpha/r)/(1-p) * B A (x * mask), with the mask it drew
    base = torch.nn.Linear(64, 96, bias=False, dtype=torch.bfloat16)
    layer = LoRALinear(base, LoraConfig(r=4, alpha=8, dropout=0.25)).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    xin = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    torch.manual_seed(5)
    got = layer(xin).float()
    torch.manual_seed(5)
    mask = drop_unscaled(torch.ones_like(xin), 0.25)
    A, B, W = (m.weight.float() for m in (layer.lora_A, layer.lora_B, base))
    expected = xin.float() @ W.T + 2.0 / 0.75 * ((xin * mask).float() @ A.T @ B.T)
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    # eval mode: no mask, plain scaling
    layer.eval()
    plain = xin.float() @ W.T + 2.0 * (xin.float() @ A.T @ B.T)
    assert (layer(xin).float() - plain).abs().max() <= 0.02 * plain.abs().max()


def test_checkpointing_replays_the_dropout_masks(stories):
    """Recomputation must draw the masks the forward drew, or the LoRA grads are wrong:
    with and without checkpointing the gradients must be identical."""
    grads = []
    for checkpointing in (False, True):
        model = load_model(stories)
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.3))
        randomize_lora(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(7)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_selective_checkpointing_keeps_matmuls_and_gives_the_same_gradients(stories, monkeypatch):
    """Keeping the 4-bit matmul outputs must skip their recompute (fewer dequantizations)
    and change nothing else: gradients bitwise equal to full recomputation."""
    from qlora.checkpointing import kept_output_bytes
    from qlora.model import decoder_layers
    calls = {"n": 0}
    real = cpu_matmul._weight_rows

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_matmul, "_weight_rows", counting)
    results = {}
    for mode in ("none", "recompute", "keep_all", "keep_2"):
        model = load_model(stories)
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.3))
        randomize_lora(model)
        if mode != "none":
            enable_gradient_checkpointing(model, keep_matmul_layers={"recompute": 0, "keep_all": 99,
                                                                     "keep_2": 2}[mode])
        model.train()
        ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(7)
        calls["n"] = 0
        model(ids, labels=ids).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[mode] = (calls["n"], grads)
    # one dequantization (a single tile at these sizes) per linear per pass; the recompute
    # skips down_proj's matmul anyway (its output is unread), so keeping saves the other six
    n_layers = len(decoder_layers(model))
    linears = sum(isinstance(m, quant.Linear4bit) for m in model.modules())  # one forward pass
    recomputed = linears - n_layers  # per recompute of every layer
    assert results["recompute"][0] - results["keep_all"][0] == recomputed  # no recompute at all
    assert results["keep_2"][0] - results["keep_all"][0] == recomputed * (n_layers - 2) // n_layers
    for mode in ("recompute", "keep_all", "keep_2"):
        for n, g in results["none"][1].items():
            assert torch.equal(g, results[mode][1][n]), (mode, n)
    # 7 linears of stories260K: q 64, k 32, v 32, o 64, gate 172, up 172, down 64 wide, bf16,
    # and attention's output (8 heads x 8 wide, bf16) with a fp32 log-sum-exp per head
    assert kept_output_bytes(model, tokens=10) == 10 * ((64 + 32 + 32 + 64 + 172 + 172 + 64) * 2
                                                        + 64 * 2 + 8 * 4)


def test_lora_init_and_trainable_count(stories):
    model = load_model(stories)
    before = model(torch.arange(10).view(1, 10)).logits
    targets = add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    layers = lora_layers(model)
    assert all(torch.count_nonzero(l.lora_B.weight) == 0 for l in layers.values())
    assert all(l.lora_A.weight.dtype == torch.float32 for l in layers.values())  # lora.dtype auto
    # B = 0: an untouched adapter is exactly the base model
    assert torch.equal(model(torch.arange(10).view(1, 10)).logits, before)
    expected = sum(4 * (l.in_features + l.out_features) for l in layers.values())
    assert trainable_report(model)["trainable"] == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.{w}.weight" for n in layers for w in ("lora_A", "lora_B")}


def test_targets_by_name(stories):
    model = load_model(stories)
    assert add_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj"])) == ["q_proj", "v_proj"]
    assert len(lora_layers(model)) == 10


def test_peft_loads_our_adapter(stories, tmp_path):
    from peft import PeftModel
    ours = load_model(stories)
    add_lora(ours, LoraConfig(r=8, alpha=16, dropout=0.0))
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(
        reference_4bit(stories), tmp_path / "adapter").train()  # fp32 factors, as ours
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), peft_model(ids).logits.float()
        base = reference_4bit(stories)(ids).logits.float()
        exact = fp32_twin(ours)(ids).logits
    assert (a - base).abs().max() > 0.5  # the adapter really changes the output...
    assert_agrees_with_peft(a, b, exact)  # ...and PEFT agrees on how


def test_we_load_peft_adapter(stories, tmp_path):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(reference_4bit(stories), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    # PEFT's default upcasts the factors to fp32, as qlora's lora.dtype auto
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_model(stories), tmp_path / "peft")
    assert len(lora_layers(ours)) == 35
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), peft_model.train()(ids).logits.float()
        exact = fp32_twin(ours)(ids).logits
    assert_agrees_with_peft(a, b, exact)


def test_gradient_checkpointing_trains_every_b_and_freezes_base(stories):
    model = load_model(stories)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    enable_gradient_checkpointing(model)
    model.train()
    frozen = {n: (p.data.clone(), p.data.dtype) for n, p in model.named_parameters() if not p.requires_grad}
    frozen_qs = {n: m.weight.quant_state.absmax.clone() for n, m in model.named_modules()
                 if isinstance(m, quant.Linear4bit)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    for name, layer in lora_layers(model).items():
        assert torch.count_nonzero(layer.lora_B.weight) > 0, f"{name}.lora_B stayed zero"
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p.data, frozen[n][0]), n
    for n, m in model.named_modules():
        if n in frozen_qs:
            assert torch.equal(m.weight.quant_state.absmax, frozen_qs[n]), n


def test_memory_is_released_between_layers_once_it_grew_and_only_in_training(stories, monkeypatch):
    """Before every layer's forward and its recompute in backward, memory is released once
    RSS grew past the budget; never under no_grad (generation); gradients are unchanged."""
    from qlora import memory
    from qlora.model import decoder_layers
    if memory._LIBC is None:
        pytest.skip("not glibc: nothing to release")
    calls = {"n": 0}
    monkeypatch.setattr(memory._LIBC, "malloc_trim", lambda pad: calls.__setitem__("n", calls["n"] + 1))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for budget in (None, -1, 2**40):  # unhooked; release at every check; never grown enough
        model = load_model(stories)
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
        randomize_lora(model)
        enable_gradient_checkpointing(model)
        if budget is not None:
            monkeypatch.setattr(memory, "LAYER_TRIM_BUDGET", budget)
            handles = memory.release_memory_per_layer(decoder_layers(model))
        model.train()
        torch.manual_seed(3)
        calls["n"] = 0
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if budget == -1:
            n_layers = len(decoder_layers(model))
            assert len(handles) == 2 * n_layers and calls["n"] == 2 * n_layers  # forward + recompute
            calls["n"] = 0
            with torch.no_grad():
                model(ids)
            assert calls["n"] == 0
            # transformers 5.17 ran module hooks again in the recompute (5.23 keeps them
            # outside): the pre-hook must not check a second time there
            layer = decoder_layers(model)[0]
            with quant.checkpoint_phase([], "recompute"):
                for hook in layer._forward_pre_hooks.values():
                    hook(layer, (ids,))
            assert calls["n"] == 0
        else:
            assert calls["n"] == 0
    assert all(torch.equal(grads[0][n], grads[i][n]) for i in (1, 2) for n in grads[0])


def test_release_if_grown_trims_only_past_the_budget(monkeypatch):
    from qlora import memory
    if memory._LIBC is None:
        pytest.skip("not glibc: nothing to release")
    assert 10e6 < memory.rss_bytes() < 1e13  # this process, read from /proc
    rss = {"now": 1000}
    monkeypatch.setattr(memory, "rss_bytes", lambda: rss["now"])
    monkeypatch.setattr(memory._LIBC, "malloc_trim", lambda pad: rss.__setitem__("now", rss["now"] - 300))
    memory.release_freed_memory()  # the level after a release is the reference: 700
    assert not memory.release_if_grown(budget=500)
    rss["now"] = 1200  # exactly the budget past 700: not yet
    assert not memory.release_if_grown(budget=500)
    rss["now"] = 1201
    assert memory.release_if_grown(budget=500) and rss["now"] == 901
    assert not memory.release_if_grown(budget=500)  # measured again from 901


_THP_PROBE = """
import os, resource
import qlora, torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # 64 MB: above glibc's largest mmap threshold, so mapped (and faulted) afresh each time
    a = torch.empty(64 << 20, dtype=torch.uint8)
    a.fill_(1)
    del a
print(os.environ["THP_MEM_ALLOC_ENABLE"], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_import_asks_torch_for_huge_pages_unless_told_not_to():
    """`import qlora` sets THP_MEM_ALLOC_ENABLE=1 before torch's first large allocation (an
    explicit value wins), and where the kernel grants transparent huge pages on request,
    torch's large blocks then fault in 2 MB at a time: a small fraction of the faults."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["PYTHONPATH"] = python_path()
    runs = {}
    for value in (None, "0"):
        out = subprocess.run([sys.executable, "-c", _THP_PROBE], capture_output=True, text=True, check=True,
                             env=env if value is None else {**env, "THP_MEM_ALLOC_ENABLE": value}).stdout.split()
        runs[value] = (out[0], int(out[1]))
    assert runs[None][0] == "1" and runs["0"][0] == "0"
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        mode = ""
    if "[madvise]" not in mode and "[always]" not in mode:
        pytest.skip(f"no transparent huge pages on request here ({mode.strip() or 'not Linux'})")
    assert runs["0"][1] > 8 * (64 << 20) // 4096 // 2  # 4 KB pages: ~16K faults per block
    assert runs[None][1] < runs["0"][1] / 8, runs


def test_bad_inputs_name_the_culprit(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QloraError, match="empty: not a model folder"):
        load_model(tmp_path / "empty")
    with pytest.raises(QloraError, match="nowhere: model path not found"):
        load_model(tmp_path / "nowhere")
    sharded = write_tiny_model(tmp_path / "sharded", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (sharded / victim).unlink()
    with pytest.raises(QloraError, match=f"{victim}: shard listed in .* is missing"):
        load_model(sharded)
    with pytest.raises(QloraError, match="lora target 'qkv_proj' matches no linear"):
        add_lora(load_model(tiny_model), LoraConfig(targets=["q_proj", "qkv_proj"]))
    # An architecture whose blocks hold no nn.Linear (GPT-2 uses Conv1D) has nothing to target.
    from transformers import GPT2Config
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(gpt2)
    shutil.copy(tiny_model / "model.safetensors", gpt2 / "model.safetensors")
    with pytest.raises(QloraError, match="GPT2LMHeadModel: no decoder blocks with linear layers"):
        load_model(gpt2)


def test_chunked_loss_equals_transformers_loss_and_gradients(stories, monkeypatch):
    """Loss over labelled positions only, head + cross-entropy in chunks whose gradient is
    taken in forward: the same sum as transformers' full-logits loss, and LoRA gradients as
    close to the fp32 twin's as transformers' own bf16 gradients are. (Not bitwise theirs:
    the head's gradient is rounded to bf16 before the loss's 1/n scale, not after.)"""
    from qlora import loss as L
    monkeypatch.setattr(L, "CHUNK_TOKENS", 7)  # 3 chunks per row below
    model = load_model(stories)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    randomize_lora(model)
    model.train()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt

    def lora_grads(m, loss_fn):
        m.zero_grad()
        loss_fn(m).backward()
        return torch.cat([p.grad.float().flatten() for k, p in m.named_parameters() if "lora_" in k])

    def ours_fn(m):
        s, n = L.lm_loss_sum(m, {"input_ids": ids, "labels": labels})
        assert n == 2 * 15 - 4 and type(s.grad_fn).__name__ == "_HeadCrossEntropyBackward"  # fused
        ours_fn.loss = s.item() / n
        return s / n

    ours = lora_grads(model, ours_fn)
    ref_loss = model(ids, labels=labels).loss.item()  # mean over the same n positions
    ref = lora_grads(model, lambda m: m(ids, labels=labels).loss)
    exact = lora_grads(fp32_twin(model), lambda m: m(ids, labels=labels).loss)
    assert abs(ours_fn.loss - ref_loss) < 1e-3 * ref_loss
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(ours - exact) <= 1.25 * rms(ref - exact), (rms(ours - exact), rms(ref - exact))
    assert rms(ours - ref) <= 2 * rms(ref - exact), (rms(ours - ref), rms(ref - exact))


@pytest.mark.parametrize("bias", [False, True])
def test_head_loss_gradient_at_a_llama_vocabulary(bias):
    """Two chunks at Llama-2's head shape (32000 x 2048, bf16): the fused loss and its
    gradient against float64 math, no less accurate than autograd's bf16 path (the head in
    bf16, log-softmax in fp32), which a trainable head still takes."""
    from qlora import loss as L
    g = torch.Generator().manual_seed(0)
    n, c, v = 300, 2048, 32000  # two chunks, the second ragged
    head = torch.nn.Linear(c, v, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
    head.weight.copy_(torch.randn(v, c, generator=g) * 0.02)
    if bias:
        head.bias.copy_(torch.randn(v, generator=g))
    h0 = torch.randn(n, c, generator=g).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), generator=g)
    h64 = h0.double().requires_grad_()
    logits64 = h64 @ head.weight.double().t() + (head.bias.double() if bias else 0)
    exact = torch.nn.functional.cross_entropy(logits64, y, reduction="sum")
    (exact / n).backward()

    h = h0.clone().requires_grad_()
    assert L._fused(head, h)
    ours = L._HeadCrossEntropy.apply(h, head.weight, head.bias, y)
    (ours / n).backward()
    h_ref = h0.clone().requires_grad_()
    ref = sum(L._chunk_loss(head, h_ref[i:i + 256], y[i:i + 256]) for i in range(0, n, 256))
    (ref / n).backward()
    err = lambda t: ((t.double() - h64.grad).norm() / h64.grad.norm()).item()  # noqa: E731
    # the same bf16 logits as autograd's path (a bias rounds them further from float64's)
    assert abs(ours.item() - ref.item()) <= 1e-5 * exact.item()
    assert abs(ours.item() - exact.item()) <= 1e-4 * exact.item()
    assert err(h.grad) <= 1.1 * err(h_ref.grad), (err(h.grad), err(h_ref.grad))
    head.weight.requires_grad_(True)  # a trainable head is not fused
    assert not L._fused(head, h)
