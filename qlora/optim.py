"""Optimizers (bitsandbytes paged/8-bit, torch AdamW), learning-rate schedules, paged
optimizer state across checkpoints, and dynamic loss scaling for fp16 compute."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import cpu_adam, quant  # noqa: F401  (quant quiets bitsandbytes' import-time CPU warning)
import bitsandbytes as bnb  # noqa: E402
from bitsandbytes import functional as bnb_F  # noqa: E402

OPTIMIZERS = {
    # QLoRA's default: optimizer state pages to CPU RAM under GPU memory spikes. All are
    # bitsandbytes' classes; on CPU the 8-bit ones step many tensors at once (cpu_adam.py).
    "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    "paged_adamw_8bit": cpu_adam.PagedAdamW8bit,
    "adamw_8bit": cpu_adam.AdamW8bit,
    "adamw_torch": torch.optim.AdamW,
}
SCHEDULES = ("constant", "cosine", "linear")
# bitsandbytes' own rule (Optimizer8bit.get_state_buffer): on CUDA, a paged optimizer puts the
# state of parameters with at least this many elements in paged (managed) memory.
PAGED_MIN_NUMEL = 1e5


def build_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer by recipe name. Paged optimizers are bitsandbytes' real classes (the 8-bit
    ones with a chunked CPU step) on every device; on CPU bitsandbytes itself falls back to
    non-paged state (with a warning)."""
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


# ----------------------------------------------------------------------------- paged state

def is_paged(t: torch.Tensor) -> bool:
    """A bitsandbytes paged buffer: CUDA managed memory wrapped as a *CPU* tensor."""
    return bool(getattr(t, "is_paged", False))


def paged_bytes(optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of paged optimizer state (of `optimizer`, or every paged buffer bitsandbytes made).

    Allocator statistics (`torch.cuda.max_memory_*`) never see managed memory, yet its pages
    live on the GPU while the optimizer steps."""
    if optimizer is None:
        tensors = bnb_F.GlobalPageManager.get_instance().paged_tensors
    else:
        tensors = [v for s in optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and is_paged(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


class _CudaArray:
    """`__cuda_array_interface__` over a paged buffer, so torch can view it as a CUDA tensor."""
    _TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1", torch.float16: "<f2"}

    def __init__(self, t: torch.Tensor):
        self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": self._TYPESTR[t.dtype],
                                         "data": (t.data_ptr(), False), "version": 2, "strides": None}


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of one optimizer state tensor, for a checkpoint.

    A paged buffer looks like a CPU tensor, but its pages live on the GPU between steps:
    reading it on the host would fault every page over (and back at the next step). It is
    copied through a CUDA view of the same memory instead (device-to-host copy, the pages
    stay where they are)."""
    if is_paged(t):
        device = torch.device("cuda", getattr(t, "page_deviceid", None) or 0)
        return torch.as_tensor(_CudaArray(t), device=device).cpu()
    return t.detach().cpu().contiguous()


def _wants_paged_state(optimizer, p: torch.Tensor) -> bool:
    """Would bitsandbytes have given `p` paged state (get_state_buffer's rule)?"""
    return bool(getattr(optimizer, "is_paged", False)) and p.device.type == "cuda" \
        and p.numel() >= PAGED_MIN_NUMEL


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict, alloc=None) -> None:
    """`optimizer.load_state_dict`, keeping paged optimizers paged.

    bitsandbytes' `Optimizer8bit.load_state_dict` moves `state1`/`state2` to the device as
    ordinary tensors: after a resume a paged optimizer would no longer page (and would briefly
    hold its whole state on the GPU). Instead the state is loaded on the host and the large
    buffers are copied into fresh paged buffers, as `get_state_buffer` makes them; the rest
    goes to the parameter's device. `alloc` stands in for `bitsandbytes.functional.get_paged`.
    """
    if not isinstance(optimizer, bnb.optim.optimizer.Optimizer8bit):
        optimizer.load_state_dict(state_dict)
        return
    optimizer.load_state_dict(state_dict, move_to_device=False)
    alloc = alloc or bnb_F.get_paged
    pages = bnb_F.GlobalPageManager.get_instance()
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if not torch.is_tensor(value) or is_paged(value):
                    continue
                if key in ("state1", "state2") and _wants_paged_state(optimizer, p):
                    buf = alloc(*value.shape, dtype=value.dtype, device=p.device)
                    buf.copy_(value)  # host write once at resume; the next step prefetches it
                    pages.paged_tensors.append(buf)
                    state[key] = buf
                else:
                    state[key] = value.to(p.device)


# ----------------------------------------------------------------------------- loss scaling

@dataclass
class LossScaler:
    """Dynamic loss scaling for fp16 compute (bf16 and fp32 need none).

    fp16 activations' gradients underflow to zero below ~6e-8; the loss is multiplied by
    `scale` before backward and the LoRA gradients (fp32 factors) divided by it after. A
    step whose gradients overflow (inf/nan) is skipped and the scale halved; after
    `growth_interval` good steps in a row it doubles. Same policy as torch's GradScaler,
    written out so its state is two numbers in trainer_state.json.
    """
    scale: float = 2.0 ** 16
    growth_interval: int = 2000
    good_steps: int = 0
    MIN_SCALE = 1.0  # overflowing even at scale 1 is a real non-finite gradient, not scaling

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.MIN_SCALE, self.scale / 2)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, d: dict) -> None:
        self.scale, self.good_steps = float(d["scale"]), int(d["good_steps"])
