"""LoRA: a frozen base linear plus a trainable low-rank update `scaling * B @ A`.

    y = base(x) + scaling * B(A(dropout(x)))      A: (r, in), B: (out, r)

A starts Kaiming-uniform and B at zero, so an untouched adapter is exactly the base model.
Module paths follow PEFT (`<linear>.base_layer`, `<linear>.lora_A`, `<linear>.lora_B`) so the
saved keys are PEFT's with no renaming table.

Projections that read one tensor (q/k/v, gate/up) share their adapters' input side
(`SharedInput`, lora.fuse_shared_inputs): one dropout mask and one GEMM with the A factors
stacked, instead of one of each per projection. The factors stay separate parameters.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import LoraConfig
from .dtypes import dtype_named
from .model import target_linears
from .quant import QuantLinear


class LoRALinear(nn.Module):
    """`base_layer` plus the adapter `s` describes (r, scaling, dropout, factor dtype)."""

    def __init__(self, base_layer: nn.Linear, s: LoraConfig):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.scaling, self.dropout = s.r, s.scaling, s.dropout
        dtype = dtype_named(s.resolved_dtype(), "lora.dtype")
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, s.r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(s.r, base_layer.out_features, bias=False, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.shared: SharedInput | None = None  # set by add_lora for q/k/v and gate/up

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        a = self.down(x)  # (B, T, r)
        if isinstance(self.base_layer, QuantLinear):  # B's GEMM inside the 4-bit matmul's tiles
            return self.base_layer(x, lora=(a, self.lora_B.weight))  # (B, T, out)
        return lora_up(self.base_layer(x), a, self.lora_B.weight)  # (B, T, out), base frozen

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's input side, scaling * A(dropout(x)): (B, T, in) -> (B, T, r), shared
        with its siblings when it has some (`SharedInput`)."""
        if self.shared is not None:
            return self.shared.down(self, x)
        return lora_down(x, self.lora_A.weight, self.scaling, self.dropout if self.training else 0.0)


def lora_up(out: torch.Tensor, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`out + B(a)`: the base output (B, T, out) plus B (out, r) applied to a (B, T, r), cast
    to the base's dtype. For 16-bit bases; a 4-bit base adds B(a) inside its matmul
    (`quant.QuantLinear.forward`'s `lora`)."""
    return out + F.linear(a, weight).to(out.dtype)


def lora_down(x: torch.Tensor, weight: torch.Tensor, scaling: float, dropout: float) -> torch.Tensor:
    """`scaling * A(dropout(x))`: (B, T, in) -> (B, T, rows of `weight`), in A's dtype.

    Inverted dropout with its 1/(1-p) folded into the scale: A is linear, so
    A(x * m / (1-p)) = A(x * m) / (1-p), and the scale is applied on the r-wide side, where
    it is cheaper than on the in-wide input or the out-wide output.
    """
    x = x.to(weight.dtype)
    if dropout > 0:
        x = drop_unscaled(x, dropout)
        scaling = scaling / (1 - dropout)
    return F.linear(x, weight) * scaling  # (B, T, r)


class SharedInput:
    """The adapters of projections that transformers calls with one tensor (q/k/v: the
    normed hidden state; gate/up: the normed attention output).

    The first of them to see a new input computes the A side of all: one dropout mask and
    one GEMM with their A factors stacked, (B, T, in) @ (in, n*r). The others find that input
    (the same object, unmodified) and take their r columns. At 1.3B this draws 34% fewer
    mask elements per layer than a mask per projection and runs 4 A GEMMs instead of 7
    (`benchmarks/levers.py`). A projection called with another tensor than its siblings (a
    cross-attention's keys, say) computes its own, so the result is never wrong, only
    unshared. Checkpointing's recompute calls the projections in the same order, so it
    replays the same masks.
    """

    def __init__(self, members: list[LoRALinear]):
        self.members = members
        self._x: torch.Tensor | None = None
        self._version = -1
        self._a: torch.Tensor | None = None  # (B, T, n*r), until every member took its part
        self._waiting: list[LoRALinear] = []

    def down(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s scaling * A(dropout(x)), shared with its siblings: (B, T, r)."""
        if not (x is self._x and _version(x) == self._version and layer in self._waiting):
            self._compute(layer, x)
        self._waiting.remove(layer)
        i, r = self.members.index(layer), layer.r
        a = self._a[..., i * r:(i + 1) * r]
        if not self._waiting:  # everyone served: do not keep the activation alive
            self._x = self._a = None
        return a

    def _compute(self, layer: LoRALinear, x: torch.Tensor) -> None:
        weight = torch.cat([m.lora_A.weight for m in self.members])  # (n*r, in)
        self._a = lora_down(x, weight, layer.scaling, layer.dropout if layer.training else 0.0)
        self._x, self._version, self._waiting = x, _version(x), list(self.members)


def _version(x: torch.Tensor) -> int:
    """How often `x` was modified in place (inference-mode tensors do not count: -1)."""
    return -1 if x.is_inference() else x._version


# Projections of one decoder layer that transformers' Llama-style modules call with the
# same tensor (LlamaAttention, LlamaMLP, and the families that copy them).
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def share_inputs(model: nn.Module) -> int:
    """Give sibling adapters of a SHARED_INPUT_GROUPS group one SharedInput; return the
    number of groups. Siblings must agree on rank, scaling, dropout and dtype (one adapter's
    do), else they stay on their own."""
    groups = 0
    for parent in model.modules():
        for names in SHARED_INPUT_GROUPS:
            members = [m for n in names if isinstance(m := getattr(parent, n, None), LoRALinear)]
            if len(members) < 2 or len({(m.r, m.scaling, m.dropout, m.lora_A.weight.dtype)
                                        for m in members}) > 1:
                continue
            group = SharedInput(members)
            for m in members:
                m.shared = group
            groups += 1
    return groups


def unshare_inputs(model: nn.Module) -> None:
    """Undo `share_inputs`: every adapter computes its own input side again."""
    for layer in lora_layers(model).values():
        layer.shared = None


# Random words per numpy stream of a dropout mask (four mask elements each): a fixed split,
# so a mask is the same on any number of cores; a (512, 2048) input takes two streams.
MASK_STREAM_WORDS = 1 << 17
_mask_pool: list[ThreadPoolExecutor] = []
_mask_pool_lock = [threading.Lock()]


def _helpers_pool() -> ThreadPoolExecutor:
    with _mask_pool_lock[0]:
        if not _mask_pool:
            _mask_pool.append(ThreadPoolExecutor(max(1, torch.get_num_threads() - 1),
                                                 thread_name_prefix="qlora-mask"))
        return _mask_pool[0]


def _forget_pool() -> None:
    """A forked child (a DataLoader worker, datasets' num_proc) inherits the pool without its
    threads, and maybe the lock held: it makes its own on first use."""
    _mask_pool.clear()
    _mask_pool_lock[0] = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def drop_unscaled(x: torch.Tensor, p: float) -> torch.Tensor:
    """`x` with each element zeroed with probability `p` (no 1/(1-p) rescale).

    On CPU, `F.dropout`'s Bernoulli sampler is slow: 16 random bits per element compared
    with an integer threshold give the same distribution (p resolved to 1/65536) and saved
    1.3-1.9 s of a ~10 s 1.3B step (benchmarks/levers.py, `mask`). The bits come from numpy's
    PCG64DXSM, faster than torch's Mersenne Twister (`rng` row: 4% of a 1.3B step with bf16
    factors), seeded by one draw from torch's default generator: gradient
    checkpointing's RNG replay restores that generator, so the recompute draws the same
    seed and the same mask, and `torch.manual_seed` still fixes every mask.
    On CUDA (and any other accelerator) the Bernoulli kernel is already cheap, and the mask
    stays on the device, so it is used there.

    The mask comes in x's dtype (ones and zeros) and multiplies x, as F.dropout's does: on CPU
    `torch.where` with a bool mask runs 4-6x slower than a 16-bit multiply, and the product
    and its backward run in every forward, recompute and backward (`where` row of
    benchmarks/levers.py). A dropped inf or NaN gives NaN, as with F.dropout.
    """
    with torch.profiler.record_function("qlora::dropout"):  # benchmarks/_breakdown.py's label
        if x.device.type != "cpu":
            return x * torch.empty_like(x).bernoulli_(1 - p)
        seed = int(torch.randint(0, 2**62, ()).item())
        return x * keep_mask(seed, x.numel(), p, x.dtype).view(x.shape)


# integer types (numpy, torch) that hold a float dtype's bit patterns, by item size
_BITS = {2: (np.int16, torch.int16), 4: (np.int32, torch.int32), 8: (np.int64, torch.int64)}


def keep_mask(seed: int, n: int, p: float, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """(n,) of `dtype`, each element 1 (True) with probability 1 - p, else 0, drawn from `seed`.

    The words come in streams of MASK_STREAM_WORDS, each from its own child of the seed
    (numpy's SeedSequence.spawn: independent streams), drawn and compared in threads: numpy
    releases the GIL for both, so a mask no longer waits on one core (`maskthreads` row of
    benchmarks/levers.py). A float mask is written as integers: the comparison's 0/1 times
    the bit pattern of 1.0 in `dtype`.
    """
    words = (n + 3) // 4  # uint64 words, four int16 lanes each
    if dtype == torch.bool:
        keep, one = np.empty(4 * words, dtype=np.bool_), 1
    else:
        np_bits, torch_bits = _BITS[dtype.itemsize]
        keep = np.empty(4 * words, dtype=np_bits)
        one = int(torch.ones((), dtype=dtype).view(torch_bits).item())  # 0x3F80 for bf16
    threshold = round(p * 65536) - 32768  # lanes are uniform on [-32768, 32767]: P(keep) = 1 - p
    starts = range(0, words, MASK_STREAM_WORDS)
    streams = np.random.SeedSequence(seed).spawn(len(starts))

    todo = iter(range(len(starts)))  # shared by the threads (next() holds the GIL): each takes the next stream

    def fill() -> None:
        for i in todo:
            a = starts[i]
            w = np.random.PCG64DXSM(streams[i]).random_raw(min(MASK_STREAM_WORDS, words - a))
            out = keep[4 * a: 4 * (a + w.size)]
            np.greater_equal(w.view(np.int16), threshold, out=out, casting="unsafe")
            if one != 1:
                np.multiply(out, one, out=out)

    helpers = min(len(starts), torch.get_num_threads()) - 1
    running = [_helpers_pool().submit(fill) for _ in range(helpers)] if helpers > 0 else []
    fill()  # this thread works too, until no stream is left
    for r in running:  # a helper that never started has nothing left to do: cancel it
        if not r.cancel():
            r.result()  # wait for the stream it is drawing (and raise its error)
    return torch.from_numpy(keep[:n]).view(dtype)


def add_lora(model: nn.Module, s: LoraConfig) -> list[str]:
    """Wrap every target linear of `model` in a LoRALinear (in place); return the leaf names.

    Only the LoRA factors require grad afterwards; everything else is frozen.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    linears = target_linears(model, s.targets)
    for name, linear in linears.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, LoRALinear(linear, s))
    if s.fuse_shared_inputs:
        share_inputs(model)
    model.qlora_lora = s
    return sorted({n.rsplit(".", 1)[-1] for n in linears})


def remove_lora(model: nn.Module) -> None:
    """Undo `add_lora`: every LoRALinear gives its place back to its base layer (in place)."""
    for name, layer in lora_layers(model).items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, layer.base_layer)
    if hasattr(model, "qlora_lora"):
        del model.qlora_lora


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_report(model: nn.Module) -> dict[str, int]:
    """Counts for the user: trainable (LoRA) parameters vs all parameters.

    4-bit weights are stored two per byte; we count logical parameters (out * in). A tied
    embedding/head matrix is one parameter and counts once.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():  # unique parameters
        qs = getattr(p, "quant_state", None)
        total += math.prod(qs.shape) if qs is not None else p.numel()
    return {"trainable": trainable, "total": total}


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """`W + scaling * B @ A`, computed in fp32 and cast once at the end (pure function).

    One fp32 copy of W, updated in place by a fused multiply-add: at a 65B MLP weight
    (22016 x 8192) a separate delta and its scaled copy would be 1.4 GB more peak memory."""
    out = weight.to(torch.float32, copy=True)  # (out, in)
    out.addmm_(lora_B.float(), lora_A.float(), alpha=scaling)  # += scaling * (out, r) @ (r, in)
    return out.to(dtype)
