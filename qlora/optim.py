"""Optimizers (bitsandbytes paged/8-bit, torch AdamW) and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from . import quant  # noqa: F401  (quiets bitsandbytes' import-time CPU warning)
import bitsandbytes as bnb  # noqa: E402

OPTIMIZERS = {
    # QLoRA's default: optimizer state pages to CPU RAM under GPU memory spikes.
    "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    "adamw_8bit": bnb.optim.AdamW8bit,
    "adamw_torch": torch.optim.AdamW,
}
SCHEDULES = ("constant", "cosine", "linear")


def build_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer by recipe name. Paged optimizers are bitsandbytes' real classes on every
    device; on CPU bitsandbytes itself falls back to non-paged state (with a warning)."""
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float, schedule: str):
    warmup = math.ceil(total_steps * warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, schedule))
