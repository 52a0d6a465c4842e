"""The chunked CPU step of bitsandbytes' AdamW (qlora/cpu_adam.py) against bitsandbytes' own."""

import copy

import pytest
import torch

import bitsandbytes as bnb

from qlora import cpu_adam
from qlora.optim import OPTIMIZERS, build_optimizer

REFERENCE = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit}

# LoRA factor shapes at 7B's widths (r 16), one above CHUNK (sliced), runs of small ones
# (concatenated), one under bitsandbytes' 4096-element 8-bit threshold (32-bit state) and one
# off the 256-element block grid: the last two take bitsandbytes' own step.
SHAPES = [(16, 4096), (11008, 16), (16, 576), (192, 16), (16, 576), (16, 32768), (1536, 16), (10, 410)]


def _params(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(dtype)) for s in SHAPES]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # lora.dtype bfloat16 / auto
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_chunked_step_is_bitwise_bitsandbytes_step(name, dtype):
    ours, ref = _params(dtype=dtype), _params(dtype=dtype)
    opt = build_optimizer(ours, name, lr=2e-3, weight_decay=0.01)
    ref_opt = REFERENCE[name](ref, lr=2e-3, weight_decay=0.01)
    assert isinstance(opt, REFERENCE[name]) and type(opt) is not REFERENCE[name]
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        for a, b in zip(ours, ref):
            a.grad = (torch.randn(a.shape, generator=g) * 10 ** -step).to(dtype)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b, before in zip(ours, ref, _params(dtype=dtype)):
        assert not torch.equal(a, before), a.shape  # every tensor stepped
        assert torch.equal(a, b), a.shape
        sa, sb = opt.state[a], ref_opt.state[b]
        assert sa.keys() == sb.keys() and sa["step"] == sb["step"] == 4
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), (a.shape, k)
    assert sum(opt.state[p]["state1"].dtype == torch.uint8 for p in ours) == len(SHAPES) - 1  # (192, 16): 32-bit


def test_every_8bit_adam_recipe_name_takes_the_chunked_step():
    assert {name for name, cls in OPTIMIZERS.items() if issubclass(cls, cpu_adam.ChunkedCpuStep)} == set(REFERENCE)


def test_runs_cover_every_element_once_on_block_edges():
    sizes = [9216, 24576, 600000, 3072, 9216]
    seen = [torch.zeros(n, dtype=torch.int32) for n in sizes]
    for run in cpu_adam._runs(sizes):
        assert sum(b - a for _, a, b in run) <= cpu_adam.CHUNK
        for i, a, b in run:
            assert a % cpu_adam.BLOCK == 0
            seen[i][a:b] += 1
    assert all(bool((s == 1).all()) for s in seen)


def test_state_dict_loads_into_bitsandbytes_own_class_and_steps_the_same():
    ours, ref = _params(), _params()
    opt = build_optimizer(ours, "paged_adamw_8bit", lr=1e-3, weight_decay=0.0)
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.step()
    ref_opt = bnb.optim.PagedAdamW8bit(ref, lr=1e-3, weight_decay=0.0)
    ref_opt.load_state_dict(opt.state_dict())
    for a, b in zip(ours, ref):
        b.data.copy_(a.data)
        a.grad = torch.full_like(a, -0.5)
        b.grad = a.grad.clone()
    opt.step()
    ref_opt.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b) and torch.equal(opt.state[a]["state2"], ref_opt.state[b]["state2"])


def test_groups_with_their_own_settings_and_missing_gradients():
    """Per-group lr/betas/eps/weight decay, an lr changed between steps (a scheduler), a
    tensor without a gradient in one step (its step count falls behind) and a group added
    mid-run: parameters and state bitwise bitsandbytes' own after the same sequence."""
    def groups(params):
        return [{"params": params[:3], "lr": 2e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
                {"params": params[3:6], "lr": 5e-4}]

    ours, ref = _params(), _params()
    opt = cpu_adam.PagedAdamW8bit(groups(ours), lr=1e-3, weight_decay=0.0)
    ref_opt = bnb.optim.PagedAdamW8bit(groups(ref), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        if step == 2:
            for o, ps in ((opt, ours), (ref_opt, ref)):
                o.add_param_group({"params": ps[6:], "lr": 3e-3})
                o.param_groups[0]["lr"] *= 0.5
        for i, (a, b) in enumerate(zip(ours, ref)):
            if i >= 6 and step < 2:
                continue  # not in the optimizer yet
            a.grad = None if (step == 1 and i in (0, 4)) else torch.randn(a.shape, generator=g).to(torch.bfloat16)
            b.grad = None if a.grad is None else a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b), a.shape
        assert opt.state[a]["step"] == ref_opt.state[b]["step"]
        assert all(torch.equal(opt.state[a][k], ref_opt.state[b][k]) for k in ("state1", "state2"))
    assert opt.state[ours[0]]["step"] == 3 and opt.state[ours[6]]["step"] == 2


def test_a_loaded_state_is_the_one_stepped():
    """load_state_dict replaces the state tensors: the next chunked step must update those
    (views of the replaced ones would step dead tensors), as bitsandbytes' step does."""
    ours, ref = _params(), _params()
    opt = build_optimizer(ours, "paged_adamw_8bit", lr=1e-3, weight_decay=0.0)
    ref_opt = bnb.optim.PagedAdamW8bit(ref, lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(2)

    def step():
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g).to(torch.bfloat16)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()

    step()
    saved, ref_saved = copy.deepcopy(opt.state_dict()), copy.deepcopy(ref_opt.state_dict())
    step()
    opt.load_state_dict(saved)
    ref_opt.load_state_dict(ref_saved)
    step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
        assert all(torch.equal(opt.state[a][k], ref_opt.state[b][k])
                   for k in ("state1", "state2", "absmax1", "absmax2") if k in opt.state[a])
    assert len(opt._plans) == 1
