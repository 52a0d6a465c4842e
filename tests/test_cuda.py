"""The CUDA paths, on a real GPU (every test here skips without one; CI has none).

The rest of the suite pins its models to the CPU; these run the same checks where the
4-bit matmul goes through bitsandbytes' CUDA kernels, dropout draws Bernoulli masks on the
device, the offloaded base streams from pinned host memory on a side stream, and export
rounds and merges on the GPU. CUDA kernels need not be deterministic (a backward may
accumulate with atomics), so gradients are held to a tolerance and the printed line says
whether they came out bitwise anyway (on an H100, with torch 2.11: they did).

    python -m pytest tests/test_cuda.py -q   # on a machine with a GPU
"""

from __future__ import annotations

import pytest
import torch

from qlora import checkpoint as ckpt
from qlora import optim, quant
from qlora.checkpointing import enable_gradient_checkpointing
from qlora.config import LoraConfig
from qlora.lora import LoRALinear, add_lora, lora_layers
from qlora.model import load_model

from conftest import HAS_CUDA
from test_train import alpaca_slice  # noqa: F401  (fixture)

pytestmark = [pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA"), pytest.mark.cuda,
              pytest.mark.usefixtures("gpu_visible")]
CUDA = torch.device("cuda")


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def bnb_layer(w: torch.Tensor):
    """bitsandbytes' own Linear4bit (NF4, double quant), quantized by its .cuda()."""
    import bitsandbytes as bnb
    n, k = w.shape
    ref = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64)
    return ref.cuda().train()


@pytest.mark.parametrize("n,k", [(300, 172), (4096, 4096), (11008, 4096), (4096, 11008)])
def test_4bit_layer_equals_bitsandbytes_on_cuda(n, k):
    """Quantized on the GPU in row tiles: bitsandbytes' codes and scales; forward bitwise
    bitsandbytes' Linear4bit, input gradient its `grad @ dequantize(W)`; with an adapter, the
    base output plus scaling * B A x."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    ours = quant.empty_quant_linear(torch.nn.Linear(k, n, bias=False, device="meta"), "nf4", True,
                                    torch.bfloat16)
    quant.set_quantized_weight(ours, w, CUDA, torch.bfloat16)
    ref = bnb_layer(w)
    assert torch.equal(ours.weight.data, ref.weight.data)
    assert torch.equal(quant.dequantize(ours), quant.dequantize(ref))

    x = torch.randn(2, 64, k, generator=g).bfloat16().to(CUDA)
    go = torch.randn(2, 64, n, generator=g).bfloat16().to(CUDA)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert torch.equal(ya, yb)
    ya.backward(go)
    yb.backward(go)
    assert rel_rms(xa.grad, xb.grad) < 1e-3 and torch.isfinite(xa.grad).all()

    lora = LoRALinear(ours, LoraConfig(r=16, alpha=32, dropout=0.0, dtype="bfloat16")).train()
    torch.nn.init.normal_(lora.lora_B.weight, std=0.02)
    xl = x.clone().requires_grad_()
    y = lora(xl)
    with torch.no_grad():
        want = ref(x).float() + 2.0 * (x.float() @ lora.lora_A.weight.float().t()) @ lora.lora_B.weight.float().t()
    assert rel_rms(y, want) < 1e-2
    y.backward(go)
    assert lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad.abs().sum() > 0


def test_checkpointed_cuda_step_trains_every_b_freezes_the_base_and_replays_dropout(stories):
    """One checkpointed step with dropout on the GPU: every B moves, nothing frozen changes
    (codes, scales, embeddings, norms), and the recompute replays the forward's Bernoulli
    masks: the gradients are those of the same step without checkpointing."""
    def step(checkpointing: bool):
        model = load_model(stories, device="cuda")
        torch.manual_seed(0)
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        frozen = {n: p.data.clone() for n, p in model.named_parameters() if not p.requires_grad}
        frozen.update({n + ".absmax": m.weight.quant_state.absmax.clone() for n, m in model.named_modules()
                       if isinstance(m, quant.Linear4bit)})
        ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0)).to(CUDA)
        torch.manual_seed(1)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
        return model, frozen, loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain = step(False)[2:]
    model, frozen, loss, got = step(True)
    assert loss == plain_loss  # forward: same kernels, same masks
    assert got.keys() == plain.keys()
    worst = max(rel_rms(got[k], plain[k]) for k in got)
    bitwise = all(torch.equal(got[k], plain[k]) for k in got)
    assert worst < 1e-2, (worst, bitwise)
    print(f"checkpointed vs plain LoRA gradients on CUDA: worst rel rms {worst:.2e}, bitwise {bitwise}")
    for name, layer in lora_layers(model).items():
        assert torch.count_nonzero(layer.lora_B.weight.grad) > 0, name
    now = {n: p.data for n, p in model.named_parameters() if not p.requires_grad}
    now.update({n + ".absmax": m.weight.quant_state.absmax for n, m in model.named_modules()
                if isinstance(m, quant.Linear4bit)})
    assert now.keys() == frozen.keys()
    for n in frozen:  # forward, recompute, backward and the optimizer step left them alone
        assert torch.equal(now[n], frozen[n]), n
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_peft_agrees_on_cuda(stories, tmp_path):
    """Our adapter in PEFT over transformers' 4-bit model, both on the GPU: the same logits
    (each held against the fp32 twin) and the same LoRA gradients."""
    from peft import PeftModel
    from qlora.adapter import save_adapter
    from test_core import assert_agrees_with_peft, fp32_twin, randomize_lora, reference_4bit

    ours = load_model(stories, device="cuda")
    add_lora(ours, LoraConfig(r=8, alpha=16, dropout=0.0))
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    ref = reference_4bit(stories, device_map={"": 0})
    peft_model = PeftModel.from_pretrained(ref, tmp_path / "adapter", is_trainable=True).train()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1)).to(CUDA)
    with torch.no_grad():
        exact = fp32_twin(ours)(ids).logits
    ours.train()
    a = ours(ids, labels=ids)
    b = peft_model(input_ids=ids, labels=ids)
    assert_agrees_with_peft(a.logits.float().detach(), b.logits.float().detach(), exact)
    a.loss.backward()
    b.loss.backward()
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
              for n, p in peft_model.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys()
    for n in mine:
        cos = torch.nn.functional.cosine_similarity(mine[n].float().flatten(), theirs[n].float().flatten(), dim=0)
        assert cos > 0.99, (n, cos.item())


@pytest.mark.parametrize("home", ["cpu", "disk"])
def test_offloaded_base_on_cuda_equals_resident(stories, tmp_path, home):
    """Every layer streamed (from pinned host memory, or from the disk file) onto the GPU on
    a side stream: the same loss and the same LoRA gradients as the resident model."""
    from test_offload import lora_grads
    ids = torch.arange(1, 65).view(2, 32).to(CUDA)
    want = lora_grads(load_model(stories, device="cuda"), ids)
    model = load_model(stories, device="cuda", offload=home, offload_dir=tmp_path, resident_layers=0)
    got = lora_grads(model, ids)
    assert want[0] == got[0]
    worst = max(rel_rms(got[1][k], want[1][k]) for k in want[1])
    bitwise = all(torch.equal(got[1][k], want[1][k]) for k in want[1])
    assert worst < 1e-2, (worst, bitwise)
    print(f"offloaded ({home}) vs resident LoRA gradients on CUDA: worst rel rms {worst:.2e}, bitwise {bitwise}")
    assert model.qlora_streamer.stats.fetches >= 5


def test_trained_on_cuda_exports_and_transformers_agrees(stories, alpaca_slice, tmp_path):
    """A short CUDA run, exported on the GPU: transformers' logits of the merged folder are
    those of base + adapter in our model (the merge's own verification passed too)."""
    from transformers import AutoModelForCausalLM
    from qlora.adapter import load_adapter
    from qlora.export import export
    from qlora.train import train
    from test_train import make_recipe

    train(make_recipe(stories, alpaca_slice, tmp_path / "run", max_steps=6))
    report = export(tmp_path / "run", tmp_path / "merged", dtype="bf16")
    assert report["device"].startswith("cuda")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).to(CUDA).eval()
    ours = load_adapter(load_model(stories, device="cuda"), tmp_path / "run" / "adapter").eval()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3)).to(CUDA)
    with torch.no_grad():
        a, b = ours(ids).logits.float(), merged(ids).logits.float()
    assert rel_rms(a, b) < 2e-2, rel_rms(a, b)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_every_buffer_is_on_the_device_after_loading(stories):
    model = load_model(stories, device="cuda")
    assert all(b.device.type == "cuda" for b in model.buffers())
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_paged_optimizer_stays_paged_after_resume_on_cuda():
    """Paged state saved to host tensors and loaded back lands in fresh paged (managed)
    buffers, with the same values."""
    p = torch.nn.Parameter(torch.randn(512, 512, device="cuda", dtype=torch.bfloat16))
    opt = optim.build_optimizer([p], "paged_adamw_32bit", lr=1e-3, weight_decay=0.0)
    p.grad = torch.randn_like(p)
    opt.step()
    tensors, rest = ckpt._split_optimizer_state(opt.state_dict())
    fresh = optim.build_optimizer([torch.nn.Parameter(p.detach().clone())], "paged_adamw_32bit", lr=1e-3,
                                  weight_decay=0.0)
    optim.load_optimizer_state(fresh, ckpt._join_optimizer_state(tensors, rest))
    state = next(iter(fresh.state.values()))
    assert optim.is_paged(state["state1"]) and optim.is_paged(state["state2"])
    for name in ("state1", "state2"):
        (key,) = [k for k in tensors if k.endswith("/" + name)]
        assert torch.equal(tensors[key], state[name].cpu()), key


def test_8bit_adamw_on_cuda_is_bitsandbytes_step_with_hooks_run_once():
    """On CUDA the chunked CPU step (qlora.cpu_adam) hands over to bitsandbytes' own step:
    bitwise the same update, and torch's optimizer hooks run once per step even after a plain
    bitsandbytes optimizer made torch wrap that class's step with them too."""
    import bitsandbytes as bnb
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def make():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(torch.bfloat16).cuda())
                for s in [(16, 4096), (11008, 16), (192, 16)]]

    ours, theirs = make(), make()
    opt = optim.build_optimizer(ours, "paged_adamw_8bit", lr=1e-3, weight_decay=0.01)
    ref = bnb.optim.PagedAdamW8bit(theirs, lr=1e-3, weight_decay=0.01)
    calls = []
    handle = register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(type(o).__module__))
    try:
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for a, b in zip(ours, theirs):
                a.grad = torch.randn(a.shape, generator=g).to(torch.bfloat16).cuda()
                b.grad = a.grad.clone()
            opt.step()
            ref.step()
    finally:
        handle.remove()
    assert calls.count("qlora.cpu_adam") == 3 and len(calls) == 6
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["state1"], ref.state[b]["state1"])
