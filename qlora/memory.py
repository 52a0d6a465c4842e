"""Handing freed CPU memory back to the OS during loading and training (glibc only).

torch's CPU tensors come from glibc's malloc, which keeps freed memory in its heap and
returns it to the OS only on request. Loading and training leave long-lived tensors
scattered between freed temporaries, so resident memory (what a machine's RAM limit
counts) stays above what is live unless we ask. Elsewhere (macOS, musl) these are no-ops.

Huge pages (`THP_MEM_ALLOC_ENABLE`, set by `import qlora`): every layer's forward,
recompute and backward allocates temporaries of megabytes (dequantized tiles, activations,
the loss head's chunks), and what glibc maps fresh for them, or what a release handed back,
is faulted in again 4 KB at a time: ~120 thousand page faults in a 1.3B step. With
torch's allocator asking for transparent huge pages on its 2 MB-and-up blocks, a fault brings
in 2 MB, and the same step takes ~12 thousand (bench.py's page-fault column; benchmarks/README.md,
"Huge pages").
Only Linux with THP in `madvise` or `always` mode acts on it; elsewhere it changes nothing.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from . import quant

# Per-layer release only trims once resident memory has grown this much past its level
# after the previous trim. Each trim costs faulting the released pages back in (~40 ms per
# layer at 1.3B: trimming before every layer slowed its step by 19%, benchmarks/levers.py),
# so we trim only when fragmentation has built up, not after every layer.
LAYER_TRIM_BUDGET = 256 * 2**20


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl)
        return None


_LIBC = _glibc()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_after_trim = [0]  # resident bytes right after the last trim


def rss_bytes() -> int:
    """Resident memory of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def release_freed_memory() -> None:
    """Hand memory that is free inside the C heap back to the OS.

    Quantizing leaves the kept 4-bit weights scattered between freed 16-bit temporaries, and
    a forward pass leaves activations' holes, which glibc returns only on request. In
    training (through `release_if_grown`) it lowers the 1.3B peak from 2.06 to 1.78 GB for
    ~5-7% of the step time, the cost of faulting the returned pages back in
    (benchmarks/levers.py, benchmarks/README.md "Levers of this round").
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
        _after_trim[0] = rss_bytes()


def release_if_grown(budget: int | None = None) -> bool:
    """Release freed memory if resident memory grew `budget` bytes (LAYER_TRIM_BUDGET)
    past its level after the last release; True if it did."""
    if _LIBC is None:
        return False
    if rss_bytes() <= _after_trim[0] + (LAYER_TRIM_BUDGET if budget is None else budget):
        return False
    release_freed_memory()
    return True


def release_memory_per_layer(layers: list[nn.Module]) -> list:
    """Check before each decoder layer's forward, and before its backward (which starts with
    the checkpoint's recompute), whether to release freed memory (`release_if_grown`).
    Only with gradients on: CPU training; inference is left alone. Returns the hook handles.

    Why: glibc reuses the holes one layer's temporaries leave only partly (small long-lived
    allocations, such as the autograd graph's, land in them), so at 7B shapes the heap grew
    ~25 MB per layer through the forward pass: 0.75 GB of the step's peak by layer 32
    (benchmarks/README.md, "release per layer").
    """
    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(_before_forward))
        handles.append(layer.register_forward_hook(_before_backward))
    return handles


def _before_forward(module, args) -> None:
    # not again in the recompute: `_on_grad` checked just before it
    if torch.is_grad_enabled() and not quant.recomputing():
        release_if_grown()


def _before_backward(module, args, output) -> None:
    # The output's gradient arrives just before this layer's backward (and its recompute)
    # runs: the check for the recompute happens here (see `quant.recomputing`).
    out = output[0] if isinstance(output, tuple) else output
    if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
        out.register_hook(_on_grad)


def _on_grad(grad: torch.Tensor) -> None:
    release_if_grown()
