"""LoRA: a frozen base linear plus a trainable low-rank update `scaling * B @ A`.

    y = base(x) + scaling * B(A(dropout(x)))      A: (r, in), B: (out, r)

A starts Kaiming-uniform and B at zero, so an untouched adapter is exactly the base model.
Module paths follow PEFT (`<linear>.base_layer`, `<linear>.lora_A`, `<linear>.lora_B`) so the
saved keys are PEFT's with no renaming table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LoraConfig
from .dtypes import dtype_name, dtype_named
from .model import target_linears


class LoRALinear(nn.Module):
    """`base_layer` plus the adapter `s` describes (r, scaling, dropout, factor dtype)."""

    def __init__(self, base_layer: nn.Linear, s: LoraConfig):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.scaling, self.dropout = s.r, s.scaling, s.dropout
        # lora.dtype auto follows the compute dtype this layer runs in (a 4-bit layer's own
        # compute_dtype; a 16-bit layer's weight dtype): bf16 factors for bf16, else fp32.
        compute = getattr(base_layer, "compute_dtype", None) or base_layer.weight.dtype
        dtype = dtype_named(s.resolved_dtype(dtype_name(compute)), "lora.dtype")
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, s.r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(s.r, base_layer.out_features, bias=False, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        out = self.base_layer(x)  # (B, T, out), frozen
        x = x.to(self.lora_A.weight.dtype)
        scaling = self.scaling
        if self.training and self.dropout > 0:
            # Inverted dropout with its 1/(1-p) folded into the scale: A is linear, so
            # A(x * m / (1-p)) = A(x * m) / (1-p), and the scale is applied on the r-wide side.
            x = drop_unscaled(x, self.dropout)
            scaling = scaling / (1 - self.dropout)
        a = self.lora_A(x) * scaling  # (B, T, r): cheaper to scale here than on the out side
        return out + self.lora_B(a).to(out.dtype)  # (B, T, out)


def drop_unscaled(x: torch.Tensor, p: float) -> torch.Tensor:
    """`x` with each element zeroed with probability `p` (no 1/(1-p) rescale).

    On CPU, `F.dropout`'s Bernoulli sampler is slow: 16 random bits per element, drawn as
    int64 and compared with an integer threshold, give the same distribution (p resolved to
    1/65536) and save 1.3-1.9 s of a ~10 s 1.3B step (benchmarks/levers.py). The draw comes
    from the default generator, so gradient checkpointing's RNG replay reproduces the mask.
    On CUDA the Bernoulli kernel is already cheap, so it is used there.
    """
    if x.device.type == "cuda":
        return x * torch.empty_like(x).bernoulli_(1 - p)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
    bits.random_(-2**63, 2**63 - 1)  # the full 64-bit range: all four int16 lanes uniform
    r = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    keep = r >= round(p * 65536) - 32768  # P(keep) = 1 - p
    return torch.where(keep, x, 0)


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
    model.qlora_lora = s
    return sorted({n.rsplit(".", 1)[-1] for n in linears})


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
