"""The attention function qlora gives transformers for training on CPU: SDPA's own kernels,
with the output kept across the recompute and grouped-query K/V repeated where that pays.

Two things make it faster than transformers' "sdpa" on CPU, with the same kernel:

- Kept output: in the layers whose matmul outputs `train.keep_matmuls_gb` keeps, the forward
  pass also keeps the attention's output and log-sum-exp (M x C in the compute dtype plus
  M x heads fp32 per layer, for M tokens), and the recompute hands them back to a node
  that runs SDPA's backward on them: no attention forward in the recompute.
- Repeated K/V where the K/V heads do not split evenly over the threads: torch's CPU
  flash-attention backward with grouped-query K/V shares out batch x K/V heads, so
  SmolLM2-135M's 3 K/V heads on 2 threads leave one thread idle a third of the time, and its
  attention forward + backward took 17.7 ms against 16.1 ms on K/V repeated to its 9 heads
  (`benchmarks/attention.py`, `repeat_kv` below). Where they split evenly (Llama-3-8B's 8)
  the grouped kernel is as fast or faster, and K/V stay grouped.

Anything else (a padding mask, dropout, no gradients, CUDA) is transformers' "sdpa" as is.
"""

from __future__ import annotations

import collections
import contextlib

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from . import quant

NAME = "qlora_sdpa"  # the attn_implementation a model gets from `use_qlora_attention`

# The kept (output, logsumexp) pairs of the decoder layer checkpointing is running, or None
# when that layer keeps nothing (set by `keeping`, per layer and pass).
_KEPT: list[collections.deque | None] = [None]


@contextlib.contextmanager
def keeping(kept: collections.deque | None, phase: str):
    """While active, attention calls keep their outputs in `kept` ("forward") or take them
    back from it ("recompute"); `kept` None keeps nothing."""
    if kept is not None and phase == "forward":
        kept.clear()  # leftovers of a forward whose backward never ran
    previous, _KEPT[0] = _KEPT[0], kept
    try:
        yield
    finally:
        _KEPT[0] = previous


def attention_output_bytes(tokens: int, width: int, heads: int, itemsize: int) -> int:
    """Bytes one layer's kept attention output costs: (tokens, heads x head_dim = `width`) in
    the compute dtype plus one fp32 log-sum-exp per token and head."""
    return tokens * (width * itemsize + heads * 4)


def repeats_kv(batch: int, heads: int, kv_heads: int) -> bool:
    """Whether qlora's attention repeats grouped-query K/V to every head: when the batch's K/V
    heads would not split evenly over this process's threads (see the module docstring)."""
    return kv_heads < heads and (batch * kv_heads) % torch.get_num_threads() != 0


def _flash_forward(q, k, v, scale):
    """torch's CPU flash attention, causal: (output (B, H, T, D), logsumexp (B, H, T) fp32)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)


class _CausalAttention(torch.autograd.Function):
    """Causal SDPA through torch's CPU flash-attention ops, whose forward may be skipped:
    q (B, H, T, D), k and v (B, H_kv, T, D) with H_kv dividing H -> (B, H, T, D)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, kept):
        phase = quant.phase()
        if kept and phase == "recompute":
            out, lse = kept.popleft()
        else:
            out, lse = _flash_forward(q, k, v, scale)
            if kept is not None and phase == "forward":
                kept.append((out, lse))
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, True, scale=ctx.scale)
        return gq, gk, gv, None, None


def qlora_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' attention-function signature: query (B, H, T, D), key and value
    (B, H_kv, T, D) -> ((B, T, H, D), None)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    fast = (query.device.type == "cpu" and torch.is_grad_enabled() and attention_mask is None
            and causal and dropout == 0.0 and query.shape[2] == key.shape[2] > 1
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and query.dtype in (torch.bfloat16, torch.float16, torch.float32))
    if not fast:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if repeats_kv(query.shape[0], query.shape[1], key.shape[1]):
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, T, D)
    out = _CausalAttention.apply(query, key, value, scaling, _KEPT[0])  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, D)


AttentionInterface.register(NAME, qlora_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # its masks are sdpa's


def use_qlora_attention(model: PreTrainedModel) -> None:
    """Switch a model that runs transformers' "sdpa" to `qlora_sdpa_forward`. Other
    implementations (eager, flash-attention kernels) are left as they are."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
