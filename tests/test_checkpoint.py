"""Checkpoints and resume: optimizer state of every optimizer at realistic sizes (8-bit state,
shared quantization maps, paged buffers), RNG of every device, the best checkpoint, rotation,
interrupts at the last step, and the metrics writers of a resumed run."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora import checkpoint as ckpt
from qlora import optim
from qlora.errors import TrainingInterrupted
from qlora.optim import OPTIMIZERS, build_optimizer
from qlora.train import fit, setup, train

from conftest import asset, write_tiny_model
from test_train import adapter, alpaca_slice, losses, make_recipe, signal_during_step  # noqa: F401


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A random Llama whose LoRA factors (r 16) are all >= 4096 elements, so bitsandbytes'
    8-bit optimizers keep 8-bit state for them (under 4096 they fall back to 32-bit), with
    stories260K's tokenizer (vocab 512)."""
    stories = asset("models/stories260K")
    out = write_tiny_model(tmp_path_factory.mktemp("wide") / "m", vocab_size=512, hidden_size=512,
                           intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4)
    for f in stories.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def wide_recipe(model, data, out, optimizer, **kw):
    r = make_recipe(model, data, out, optimizer=optimizer, **kw)
    r.lora.r = 16
    return r


# --------------------------------------------------------------------------- optimizer state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_state_round_trips_through_files_and_steps_the_same(tmp_path, name):
    """Several bf16 parameters above bitsandbytes' 4096-element threshold: 8-bit state with
    quantization maps shared by all of them. Through safetensors + JSON and back, the restored
    optimizer must take the very same next step."""
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 512), (256, 16), (64, 128)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g).bfloat16()) for s in shapes]
    opt = build_optimizer(params, name, lr=1e-3, weight_decay=0.0)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).bfloat16()
        opt.step()
    tensors, rest = ckpt._split_optimizer_state(opt.state_dict())
    if "8bit" in name:
        assert any(t.dtype == torch.uint8 for t in tensors.values())  # really 8-bit state
    save_file(tensors, str(tmp_path / "opt.safetensors"))  # refused shared memory before
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = build_optimizer(clones, name, lr=1e-3, weight_decay=0.0)
    optim.load_optimizer_state(fresh, ckpt._join_optimizer_state(
        load_file(str(tmp_path / "opt.safetensors")), json.loads(json.dumps(rest))))
    grads = [torch.randn(p.shape, generator=g).bfloat16() for p in params]
    for o, ps in ((opt, params), (fresh, clones)):
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, clones))
    again, _ = ckpt._split_optimizer_state(fresh.state_dict())
    after, _ = ckpt._split_optimizer_state(opt.state_dict())
    assert again.keys() == after.keys() and all(torch.equal(again[k], after[k]) for k in after)


def test_paged_state_is_restored_into_paged_buffers(monkeypatch):
    """bitsandbytes' load_state_dict would hand paged state back as ordinary device tensors.
    On CUDA our loader copies state1/state2 into fresh paged buffers; here a stand-in
    allocator and bitsandbytes' CUDA rule (`_wants_paged_state`) forced on show the routing."""
    from bitsandbytes import functional as F
    p = torch.nn.Parameter(torch.randn(64, 128).bfloat16())
    opt = build_optimizer([p], "paged_adamw_8bit", lr=1e-3, weight_decay=0.0)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    made = []

    def fake_get_paged(*shape, dtype, device):
        t = torch.zeros(*shape, dtype=dtype)
        t.is_paged = True
        made.append(t)
        return t
    monkeypatch.setattr(optim, "_wants_paged_state", lambda o, q: True)
    pages = F.GlobalPageManager.get_instance()
    before = list(pages.paged_tensors)
    fresh = build_optimizer([torch.nn.Parameter(p.detach().clone())], "paged_adamw_8bit", lr=1e-3,
                            weight_decay=0.0)
    try:
        optim.load_optimizer_state(fresh, sd, alloc=fake_get_paged)
        state = next(iter(fresh.state.values()))
        assert state["state1"] is made[0] and state["state2"] is made[1]
        assert all(optim.is_paged(state[k]) for k in ("state1", "state2"))
        saved = sd["state"][0]["__bnb_optimizer_quant_state__"]
        assert torch.equal(state["state1"], saved["state1"]) and torch.equal(state["state2"], saved["state2"])
        assert pages.paged_tensors[-2:] == made
        assert optim.paged_bytes(fresh) == 2 * 64 * 128  # two uint8 buffers
    finally:
        pages.paged_tensors[:] = before


# --------------------------------------------------------------------------- RNG


def test_checkpoints_save_and_restore_every_cuda_generator(stories, tmp_path, monkeypatch):
    """LoRA dropout draws from the CUDA generator on a GPU: a checkpoint must hold every
    device's state next to the CPU one (CUDA stood in for by recording fakes here)."""
    from qlora.config import LoraConfig
    from qlora.lora import add_lora
    from qlora.model import load_model
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda ss: restored.extend(ss))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    model = load_model(stories, device="cpu")
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], "adamw_torch", 1e-3, 0.0)
    sched = optim.build_scheduler(opt, 10, 0.0, "constant")
    torch.manual_seed(7)
    cpu = torch.get_rng_state()
    path = ckpt.save_checkpoint(tmp_path, model, opt, sched, {"step": 3}, [ckpt.rng_state()])
    assert set(load_file(str(path / "rng.safetensors"))) == {"rank0.cpu", "rank0.cuda0", "rank0.cuda1"}
    torch.manual_seed(8)
    ckpt.load_checkpoint(path, model, opt, sched, rank=0, world_size=1)
    assert torch.equal(torch.get_rng_state(), cpu)
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, states))


# --------------------------------------------------------------------------- best and rotation


def _fake_checkpoints(run_dir, evals: dict[int, dict | None]):
    for step, ev in evals.items():
        d = ckpt.checkpoint_dir(run_dir, step)
        d.mkdir(parents=True)
        (d / ckpt.STATE_NAME).write_text(json.dumps({"step": step, **({"eval": ev} if ev else {})}))


def test_best_is_only_a_checkpoint_evaluated_at_its_own_step(tmp_path):
    # step 4's state carries the eval of step 3 (other weights): no candidate.
    _fake_checkpoints(tmp_path, {2: {"step": 2, "loss": 1.5}, 4: {"step": 3, "loss": 0.5},
                                 6: {"step": 6, "loss": 1.0}, 8: {"step": 6, "loss": 1.0}})
    assert ckpt.best_checkpoint(tmp_path).name == "checkpoint-000006"


@pytest.mark.parametrize("limit,kept", [(1, [10]), (2, [2, 10]), (3, [2, 8, 10]), (5, [2, 4, 6, 8, 10])])
def test_rotation_keeps_at_most_limit_including_the_best(tmp_path, limit, kept):
    _fake_checkpoints(tmp_path, {2: {"step": 2, "loss": 0.1}, 4: {"step": 4, "loss": 0.9},
                                 6: None, 8: {"step": 6, "loss": 0.05}, 10: None})
    ckpt.rotate_checkpoints(tmp_path, limit)
    assert [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(tmp_path)] == kept


# --------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_resume_is_exact_for_every_optimizer(wide_model, alpaca_slice, tmp_path, monkeypatch, optimizer):
    """Dropout on, sample generations at every evaluation, evaluations (every 3 steps) out of
    step with saves (every 2): interrupted after step 4 and resumed, the run must equal the
    uninterrupted one bit for bit, for every optimizer, with 8-bit state where it applies."""
    kw = dict(max_steps=6, eval_steps=3, save_steps=2, sample_prompts=["Once upon a time"],
              sample_max_new_tokens=4)
    straight = tmp_path / "straight"
    train(wide_recipe(wide_model, alpaca_slice, straight, optimizer, **kw))

    resumed = tmp_path / "resumed"
    run = setup(wide_recipe(wide_model, alpaca_slice, resumed, optimizer, **kw))
    restore = signal_during_step(monkeypatch, 4)
    with pytest.raises(TrainingInterrupted) as info:
        fit(run)
    assert info.value.step == 4
    restore()
    opt_state = load_file(str(resumed / "checkpoint-000004" / "optimizer.safetensors"))
    assert any(t.dtype == torch.uint8 for t in opt_state.values()) == ("8bit" in optimizer)
    train(wide_recipe(wide_model, alpaca_slice, resumed, optimizer, **kw), resume=True)

    assert losses(straight) == losses(resumed) and len(losses(straight)) == 6
    a, b = adapter(straight), adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_signal_during_the_last_step_finishes_the_run(stories, alpaca_slice, tmp_path, monkeypatch):
    """SIGINT in the last step: one save of that step, the final adapter, no interrupt."""
    import qlora.train as T
    real_save, saves = T.save, []
    signal_during_step(monkeypatch, 4)
    monkeypatch.setattr(T, "save", lambda r: saves.append(r.state["step"]) or real_save(r))
    summary = train(make_recipe(stories, alpaca_slice, tmp_path / "run", max_steps=4, save_steps=4))
    assert summary["steps"] == 4 and saves == [4]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_resume_opens_one_metrics_writer_and_purges_replayed_steps(stories, alpaca_slice, tmp_path,
                                                                   monkeypatch):
    """TensorBoard (stood in for: it is optional) gets one writer per process lifetime, and
    on resume a purge_step so the steps run again replace their first events."""
    writers = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            self.purge_step, self.closed = purge_step, False
            writers.append(self)

        def add_scalar(self, *a):
            assert not self.closed

        def close(self):
            self.closed = True
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    restore = signal_during_step(monkeypatch, 2)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(make_recipe(stories, alpaca_slice, run_dir))
    restore()
    train(make_recipe(stories, alpaca_slice, run_dir), resume=True)
    assert [w.purge_step for w in writers] == [None, 3]
    logged = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert logged == [1, 2, 3, 4]
