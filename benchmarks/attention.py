"""Attention forward and backward on CPU: transformers' sdpa against qlora's (qlora/attention.py).

    python benchmarks/attention.py [--tokens 512] [--reps 5]

One decoder layer's causal attention at real head layouts, bf16: transformers' function
(grouped-query SDPA, `enable_gqa`) against qlora's (K/V repeated to every head, the same
kernel), forward alone and forward + backward; their difference is what a layer whose
attention output is kept pays in its recompute and backward. Best of `--reps` rounds, in ms.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from qlora import attention  # noqa: E402

# (query heads, K/V heads, head dim) of real models
LAYOUTS = {"smollm2-135m": (9, 3, 64), "llama-3-8b": (32, 8, 128), "llama-2-7b": (32, 32, 128)}


class _Module(torch.nn.Module):  # the attributes transformers' function reads
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _inputs(heads, kv_heads, dim, tokens):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, tokens, heads, dim, generator=g).to(torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, tokens, kv_heads, dim, generator=g).to(torch.bfloat16).transpose(1, 2)
            for _ in range(2))
    return q, k, v  # (B, H, T, D) views of (B, T, H, D), as Llama's attention makes them


def _best_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def run(fn, module, q, k, v, backward: bool):
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    out, _ = fn(module, q, k, v, None, scaling=q.shape[-1] ** -0.5)
    if backward:
        out.backward(torch.ones_like(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"causal attention, {args.tokens} tokens, bf16, {torch.get_num_threads()} threads; ms, best of {args.reps}")
    print("| layout | heads (K/V) x dim | sdpa fwd | qlora fwd | sdpa fwd+bwd | qlora fwd+bwd | qlora bwd alone (fwd+bwd - fwd) |")
    print("|---|---|---|---|---|---|---|")
    for name, (heads, kv_heads, dim) in LAYOUTS.items():
        q, k, v = _inputs(heads, kv_heads, dim, args.tokens)
        module = _Module(heads // kv_heads)
        ms = {}
        for label, fn in (("sdpa", sdpa_attention_forward), ("qlora", attention.qlora_sdpa_forward)):
            ms[label, "f"] = _best_ms(lambda: _forward_only(fn, module, q, k, v), args.reps)
            ms[label, "fb"] = _best_ms(lambda: run(fn, module, q, k, v, True), args.reps)
        ms["kept"] = ms["qlora", "fb"] - ms["qlora", "f"]
        print(f"| {name} | {heads} ({kv_heads}) x {dim} | {ms['sdpa', 'f']:.1f} | {ms['qlora', 'f']:.1f} | "
              f"{ms['sdpa', 'fb']:.1f} | {ms['qlora', 'fb']:.1f} | {ms['kept']:.1f} |")


def _forward_only(fn, module, q, k, v):
    """The training forward (inputs require grad, so qlora's own path runs), no backward."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    fn(module, q, k, v, None, scaling=q.shape[-1] ** -0.5)


if __name__ == "__main__":
    main()
