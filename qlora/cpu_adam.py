"""bitsandbytes' 8-bit AdamW on CPU, stepped over many tensors at once.

Why: on CPU, bitsandbytes updates one parameter at a time: dequantize its two 8-bit states,
a dozen fp32 torch ops, quantize them again. LoRA has hundreds of small factors
(SmolLM2-135M: 420 tensors, 4.9M elements), so a step pays that per-call overhead hundreds
of times. Here the same ops run over chunks of CHUNK elements, several consecutive small
tensors concatenated or a slice of a large one (16K-element chunks paid per-op overhead
again, 1024K ones were no faster: `benchmarks/cpu_kernels.py adam`).

The ops and their order are those of bitsandbytes' CPU kernel
(`backends/cpu/ops.py::_optimizer_update_8bit_blockwise_cpu`), and every element's
arithmetic is independent of its neighbours; the state's blocks are 256 elements with one
scale each and chunks start on block edges. So a chunked step is bitwise bitsandbytes' own
(`tests/test_cpu_adam.py` checks it, so a change in bitsandbytes' math shows there), and the
state keeps bitsandbytes' layout and keys: checkpoints and resume do not change. Anything
else (CUDA, 32-bit state of small tensors, per-parameter config overrides, update-norm
clipping, sizes off the block grid) takes bitsandbytes' own per-tensor step. The 32-bit
optimizers stay bitsandbytes' classes (no quantization; whether chunks pay there was not
measured). Timings, and the chunk size against smaller and larger ones:
`benchmarks/cpu_kernels.py adam` (SmolLM2's tensors: a fifth to a third of the step saved;
65B's few large ones: a tie).
"""

from __future__ import annotations

import collections
import inspect
import math

import torch

from . import quant  # noqa: F401  (quiets bitsandbytes' import-time CPU warning)
import bitsandbytes as bnb  # noqa: E402

CHUNK = 1 << 18  # elements per pass: 1 MB per fp32 temporary (a multiple of BLOCK)
BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state: one absmax per 256 elements


class ChunkedCpuStep:
    """Mixin for bitsandbytes' 8-bit Adam optimizers: CPU parameters step in chunks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plans: dict[tuple, _Plan] = {}  # (group index, parameter ids) -> plan

    @torch.no_grad()
    def step(self, closure=None):
        if any(p.device.type != "cpu" for group in self.param_groups for p in group["params"]):
            # CUDA: bitsandbytes' fused kernels, paging and syncs. Its step unwrapped: torch
            # wraps a class's step with the optimizer hooks once an instance exists, and ours
            # already ran them.
            return inspect.unwrap(super().step.__func__)(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:  # what bitsandbytes' step does first
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            chunked = collections.defaultdict(list)  # step count -> parameters
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self.init_state(group, p, gindex, pindex)
                if not self._chunkable(p, gindex, pindex):  # bitsandbytes' own step
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
                    continue
                state["step"] += 1
                chunked[state["step"]].append(p)
            for step, params in chunked.items():
                states = [self.state[p] for p in params]
                _step_chunks(self._plan(gindex, params, states), params, states, group, step)
        return loss

    def _plan(self, gindex: int, params: list[torch.Tensor], states: list[dict]) -> _Plan:
        """The plan of these parameters, rebuilt when a tensor behind it was replaced (as
        load_state_dict replaces the state): a stale plan's views would keep the old tensors
        alive and step them instead."""
        key, layout = (gindex, tuple(map(id, params))), _Plan.layout(params, states)
        plan = self._plans.get(key)
        if plan is None or plan.built_for != layout:
            if len(self._plans) >= 2 * len(self.param_groups) + 2:  # sets changed: drop the old
                self._plans.clear()
            plan = self._plans[key] = _Plan(params, states, layout)
        return plan

    def _chunkable(self, p: torch.Tensor, gindex: int, pindex: int) -> bool:
        """Whether `p` takes the chunked step: 8-bit state on whole blocks, default config."""
        args, mng = self.args, self.mng
        return (self.optimizer_name == "adam" and self.state[p]["state1"].dtype == torch.uint8
                and p.numel() % BLOCK == 0 and p.is_contiguous() and p.grad.is_contiguous()
                and args.max_unorm <= 0.0 and not args.skip_zeros
                and id(p) not in mng.pid2config and (gindex, pindex) not in mng.index2config)


def _runs(sizes: list[int]):
    """Segments (tensor index, start, end) grouped into runs of at most CHUNK elements:
    consecutive small tensors share a run, large ones are sliced at multiples of CHUNK."""
    run, total = [], 0
    for i, n in enumerate(sizes):
        for a in range(0, n, CHUNK):
            b = min(n, a + CHUNK)
            if run and total + (b - a) > CHUNK:
                yield run
                run, total = [], 0
            run.append((i, a, b))
            total += b - a
    if run:
        yield run


def _segment_views(tensors: list[torch.Tensor], run, per: int = 1) -> list[torch.Tensor]:
    """Flat views of the run's segments of `tensors` (of their scales: one per `per` elements)."""
    return [tensors[i].view(-1)[a // per: b // per] for i, a, b in run]


def _gather(views: list[torch.Tensor]) -> torch.Tensor:
    """One flat tensor: the view itself for a one-segment run, else a concatenated copy."""
    return views[0] if len(views) == 1 else torch.cat(views)


def _scatter(flat: torch.Tensor, views: list[torch.Tensor]) -> None:
    """Write a gathered copy back (a one-segment run's view was updated in place)."""
    if len(views) > 1:
        torch._foreach_copy_(views, list(flat.split([v.numel() for v in views])))


class _Plan:
    """The runs of one list of parameters, with views of the tensors that persist between
    steps (parameters and optimizer state), built once: a step over hundreds of small
    tensors would otherwise spend more time slicing than computing."""

    STATE_KEYS = ("state1", "state2", "absmax1", "absmax2")  # codes, then their block scales

    def __init__(self, params: list[torch.Tensor], states: list[dict], layout: tuple):
        self.built_for = layout  # rebuilt when this changes
        self.runs = list(_runs([p.numel() for p in params]))
        self.params = [_segment_views(params, run) for run in self.runs]
        self.states = {key: [_segment_views([s[key] for s in states], run, BLOCK if "absmax" in key else 1)
                             for run in self.runs] for key in self.STATE_KEYS}

    @staticmethod
    def layout(params: list[torch.Tensor], states: list[dict]) -> tuple:
        """Changes whenever a parameter or a state tensor is replaced (load_state_dict does)."""
        return tuple(t.data_ptr() for p, s in zip(params, states)
                     for t in (p, *(s[k] for k in _Plan.STATE_KEYS)))


def _step_chunks(plan: _Plan, params: list[torch.Tensor], states: list[dict], group: dict, step: int) -> None:
    """One Adam step of `params` (all in one param group, at the same step count)."""
    grads = [p.grad for p in params]
    for r, run in enumerate(plan.runs):
        g = _gather(_segment_views(grads, run))  # gradients are new tensors every step
        views = [plan.params[r]] + [plan.states[key][r] for key in plan.STATE_KEYS]
        flats = [_gather(v) for v in views]  # p, state1, state2, absmax1, absmax2
        _adam_8bit(g, *flats, states[0]["qmap1"], states[0]["qmap2"], group, step)
        for flat, v in zip(flats, views):
            _scatter(flat, v)


def _adam_8bit(g, p, q1, q2, a1, a2, qmap1, qmap2, group: dict, step: int) -> None:
    """bitsandbytes' blockwise 8-bit AdamW step over flat tensors: the state (codes q1, q2
    with one fp32 scale per BLOCK in a1, a2) is dequantized, stepped and quantized again."""
    (beta1, beta2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
    ops = torch.ops.bitsandbytes
    m = ops.dequantize_blockwise(q1, a1, qmap1, BLOCK, torch.float32)
    v = ops.dequantize_blockwise(q2, a2, qmap2, BLOCK, torch.float32)
    grad, pf = g.float(), p.float()
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # running mean of the gradient
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # and of its square
    correction1, correction2 = 1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step)
    denom = v.sqrt().div_(correction2).add_(eps)  # bitsandbytes' (sqrt / c2) + eps, one buffer
    if wd > 0.0:
        pf.mul_(1.0 - lr * wd)
    pf.addcdiv_(m, denom, value=-lr / correction1)
    p.copy_(pf)
    for codes, scales, x, qmap in ((q1, a1, m, qmap1), (q2, a2, v, qmap2)):
        new_codes, new_scales = ops.quantize_blockwise(x, qmap, BLOCK)
        codes.copy_(new_codes)
        scales.copy_(new_scales)


class AdamW8bit(ChunkedCpuStep, bnb.optim.AdamW8bit):
    """bitsandbytes' AdamW8bit; on CPU, stepped in chunks."""


class PagedAdamW8bit(ChunkedCpuStep, bnb.optim.PagedAdamW8bit):
    """bitsandbytes' PagedAdamW8bit (paged on CUDA); on CPU, stepped in chunks."""

