"""Causal-LM loss that never holds the full (B, T, vocab) fp32 logits.

A 7B Llama at seq 512 would hold 512 x 32000 fp32 logits (65 MB) per sequence, and a
Llama-3 vocabulary (128k) four times that, plus as much again for their gradient. We keep
only positions that have a label, and compute the head + cross-entropy in chunks, so one
chunk's logits exist at a time.

In training (a frozen head, hidden states that need a gradient) each chunk's gradient is
computed right after its loss, in the same pass: the loss is a sum, so its gradient with
respect to the hidden states is `(softmax - onehot) @ W_head` per chunk, times the scalar
that backward hands in later. That skips what autograd would do again in backward (the head
GEMM of a checkpointed recompute, a second log-softmax, the zero-filled gradient of the
target gather) and holds a chunk's logits in one fp32 buffer, not three. A trainable head
takes the checkpointed chunks instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK_TOKENS = 256  # rows of logits alive at once: 256 x 128k x 4 B = 131 MB per fp32 copy


def _chunk_loss(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V): fp32 only for this chunk, for a stable log-softmax
    return F.cross_entropy(logits, y, reduction="sum")


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W.T + bias, y_i) over (N, C) hidden states h, in chunks of CHUNK_TOKENS
    rows; the gradient with respect to h is computed in forward (W and bias are frozen)."""

    @staticmethod
    def forward(ctx, h, weight, bias, y):  # h: (N, C), weight: (V, C), y: (N,)
        total = h.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(h)  # (N, C): d total / d h
        for i in range(0, y.numel(), CHUNK_TOKENS):
            hc, yc = h[i:i + CHUNK_TOKENS], y[i:i + CHUNK_TOKENS]
            p = F.linear(hc, weight, bias).float()  # (n, V) fp32 logits, the chunk's one big buffer
            target = p.gather(1, yc[:, None])  # (n, 1)
            top = p.amax(1, keepdim=True)  # (n, 1): exp never overflows
            p.sub_(top).exp_()
            norm = p.sum(1, keepdim=True)  # (n, 1)
            total += (top + norm.log() - target).sum()  # log-sum-exp minus the target's logit
            p.div_(norm)  # softmax
            p[torch.arange(yc.numel(), device=p.device), yc] -= 1  # d CE / d logits = softmax - onehot
            torch.mm(p.to(h.dtype), weight, out=grad_h[i:i + CHUNK_TOKENS])  # (n, C)
            del p  # else the next chunk's logits are allocated while these still live
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable  # grad_h is a constant: no second derivative
    def backward(ctx, g):  # g: () fp32, the gradient of whatever used the sum
        (grad_h,) = ctx.saved_tensors
        return grad_h * g, None, None, None


def _fused(head: torch.nn.Module, h: torch.Tensor) -> bool:
    """Whether the head's gradient can be taken in forward: a plain frozen linear head and
    hidden states that need a gradient."""
    return (torch.is_grad_enabled() and h.requires_grad and type(head) is torch.nn.Linear
            and not any(p.requires_grad for p in head.parameters()))


def lm_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of token losses in fp32, number of trained tokens) for one micro-batch.

    The caller divides by the token count of the whole optimizer step, so that gradient
    accumulation and data parallelism weigh every trained token equally.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, C)
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = labels != IGNORE
    h = hidden[:, :-1][keep]  # (N, C) only positions that are trained
    y = labels[keep]  # (N,)
    head = model.get_output_embeddings()
    if _fused(head, h):
        return _HeadCrossEntropy.apply(h, head.weight, head.bias, y), int(y.numel())
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), CHUNK_TOKENS):
        hc, yc = h[i:i + CHUNK_TOKENS], y[i:i + CHUNK_TOKENS]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hc, yc)
    return total, int(y.numel())
