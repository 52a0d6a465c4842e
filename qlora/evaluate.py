"""`qlora eval`: loss and perplexity of a model (run, adapter or exported folder) on a file."""

from __future__ import annotations

import math

import torch

from .data import Collator, build_datasets, ensure_pad_token
from .loss import lm_loss_sum


@torch.no_grad()
def evaluate_model(model, tokenizer, data_path, *, format: str = "auto", max_seq_len: int = 512,
                   batch_size: int = 4) -> dict:
    """Mean loss over the trained (answer) tokens of every example, and its perplexity."""
    ensure_pad_token(tokenizer)
    ds, _, stats = build_datasets(str(data_path), tokenizer, format=format, max_seq_len=max_seq_len)
    collate = Collator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for i in range(0, len(ds), batch_size):
        batch = collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
        s, n = lm_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
        loss_sum, tokens = loss_sum + s.item(), tokens + n
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": tokens, "examples": len(ds),
            "dropped": stats.dropped_no_target}
