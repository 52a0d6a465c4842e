"""Causal-LM loss that never holds the full (B, T, vocab) fp32 logits.

A 7B Llama at seq 512 would hold 512 x 32000 fp32 logits (65 MB) per sequence, and a
Llama-3 vocabulary (128k) four times that, plus as much again for their gradient. We keep
only positions that have a label, and compute the head + cross-entropy in chunks under
activation checkpointing, so one chunk's logits exist at a time, in forward and backward.
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
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), CHUNK_TOKENS):
        hc, yc = h[i:i + CHUNK_TOKENS], y[i:i + CHUNK_TOKENS]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hc, yc)
    return total, int(y.numel())
