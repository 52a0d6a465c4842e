"""Gradient checkpointing per decoder layer, and what its recompute can leave out.

Every decoder layer runs twice before its backward: once in the forward pass, whose
activations are dropped, and again in backward (the recompute), which rebuilds the tensors
backward reads. Two things make the recompute cheaper here, both with the same gradients:

- Kept outputs (`train.keep_matmuls_gb`): in the first layers the 4-bit matmuls' outputs
  are kept from the forward pass and handed back, so those layers recompute only the cheap
  ops (norms, rotary, LoRA) at `kept_output_bytes` a layer. On CPU they also keep the
  attention's output (qlora.attention), so the recompute runs no attention forward either.
- Unread outputs: in a Llama-style layer the last matmul (down_proj) only feeds the residual
  sum that is the layer's output. Backward never reads that value (a sum's gradient does not
  need its inputs, and the recomputed output itself is thrown away), so the recompute runs
  down_proj's adapter input side, which backward does read, and skips its 4-bit matmul: one
  dequantization and the layer's largest GEMM (`benchmarks/levers.py`, `unread` row).
"""

from __future__ import annotations

import collections
import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from . import attention, quant
from .errors import QloraError
from .model import decoder_layers
from .offload import recompute_context


def enable_gradient_checkpointing(model: PreTrainedModel, keep_matmul_layers: int = 0) -> None:
    """Recompute each decoder layer in backward instead of storing its activations.

    Non-reentrant only: reentrant checkpointing drops gradients when no *input* of the
    checkpointed block requires grad (our embeddings are frozen), which is how LoRA B factors
    silently stay zero in other stacks.

    The first `keep_matmul_layers` decoder layers keep their 4-bit matmul outputs for the
    recompute (`quant.checkpoint_phase`). (torch's selective-checkpoint policies do the same
    through a Python dispatch mode on every op, whose overhead ate most of the gain on CPU:
    1.41x vs 1.33x at 1.3B.)
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also hooks the embeddings so their output requires grad (a crutch for
    # reentrant checkpointing). With frozen embeddings that only makes backward compute input
    # gradients for layer 0's q/k/v (a dequantize and a GEMM each) that nothing uses.
    model.disable_input_require_grads()
    streamer = getattr(model, "qlora_streamer", None)
    for i, layer in enumerate(decoder_layers(model)):
        keep = i < keep_matmul_layers
        linears = [m for m in layer.modules() if isinstance(m, quant.QuantLinear)]  # found once
        for m in linears:
            m.keep_outputs, m.unread_in_recompute, m.output_node = keep, None, None
        if not isinstance(layer, GradientCheckpointingLayer):
            if keep or streamer is not None:
                raise QloraError(f"{type(layer).__name__} does not checkpoint itself per layer, so "
                                 "it cannot keep matmul outputs or stream its weights "
                                 "(set train.keep_matmuls_gb=0 and model.offload=none)")
            continue  # transformers' own checkpointing, without the recompute's savings
        # transformers' GradientCheckpointingLayer calls this attribute to checkpoint itself
        kept_attention = collections.deque() if keep else None
        layer.qlora_kept_attention = kept_attention  # (output, logsumexp) pairs, for a look
        contexts = functools.partial(_layer_contexts, linears, kept_attention, i, streamer)
        layer._gradient_checkpointing_func = functools.partial(_checkpoint_layer, linears, contexts)


def _checkpoint_layer(linears: list[quant.QuantLinear], contexts, forward, *args):
    """torch's checkpoint of one layer; after its first forward with autograd on, find which
    of its 4-bit `linears` have an output backward never reads."""
    out = checkpoint(forward, *args, use_reentrant=False, context_fn=contexts)
    if any(m.output_node is not None for m in linears):
        mark_unread_outputs(linears, args, out)
    return out


def _layer_contexts(linears, kept_attention, i, streamer):
    """(context of the original forward, context of the recompute) for torch's checkpoint.

    The recompute may not pass through module hooks (transformers 5.23 checkpoints
    `forward`, not `__call__`; see `quant.recomputing`), so this is where a streamed layer
    learns that it is needed again."""
    return (_phase(linears, kept_attention, i, None, "forward"),
            _phase(linears, kept_attention, i, streamer, "recompute"))


@contextlib.contextmanager
def _phase(linears, kept_attention, i, streamer, phase):
    with contextlib.ExitStack() as stack:  # entered only when checkpoint enters this phase
        if streamer is not None:
            stack.enter_context(recompute_context(streamer, i))
        stack.enter_context(quant.checkpoint_phase(linears, phase))
        stack.enter_context(attention.keeping(kept_attention, phase))
        yield


def mark_unread_outputs(linears: list[quant.QuantLinear], inputs: tuple, out) -> None:
    """Set `unread_in_recompute` on a layer's 4-bit `linears` from the autograd graph of its
    first forward (`out` is the layer's output, `inputs` its positional inputs).

    An output is unread when it feeds nothing but the sum that is the layer's output: the
    output's grad_fn is an AddBackward0 (a sum saves no tensors), the linear's output node
    is one of its direct inputs, and no other path inside the layer reaches that node.
    Anything else (a norm after the MLP, a dropout, a scaled residual) leaves the linear
    alone. What the graph cannot show is a value read outside autograd (a `.detach()` fed
    into a saved tensor); no decoder layer transformers ships does that after its last
    matmul.
    """
    by_node = {m.output_node: m for m in linears if m.output_node is not None}
    for m in linears:
        m.output_node = None  # the graph must not outlive this look
    outputs = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
               if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    if not outputs:
        return  # no graph (no_grad): look again at the next forward
    for m in linears:
        m.unread_in_recompute = False
    root = outputs[0].grad_fn
    if len(outputs) != 1 or type(root).__name__ != "AddBackward0":
        return
    stop = {t.grad_fn for t in inputs if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    children = [f for f, _ in root.next_functions if f is not None]
    reached, todo = set(), list(children)
    while todo:  # every node below the root's inputs, within the layer
        node = todo.pop()
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in reached and nxt not in stop:
                reached.add(nxt)
                todo.append(nxt)
    for node in children:
        if node in by_node and node not in reached:
            by_node[node].unread_in_recompute = True


def kept_output_bytes(model: nn.Module, tokens: int) -> int:
    """Bytes one kept decoder layer costs for `tokens` tokens: its 4-bit matmul outputs, and
    on CPU, where qlora's attention runs, the attention output (`attention.keeping`)."""
    linears = [m for m in decoder_layers(model)[0].modules() if isinstance(m, quant.Linear4bit)]
    if not linears:
        return 0
    dtype = linears[0].compute_dtype
    kept = sum(tokens * m.out_features * dtype.itemsize for m in linears)
    c = model.config
    if linears[0].weight.device.type == "cpu" and c._attn_implementation == attention.NAME:
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kept += attention.attention_output_bytes(tokens, heads * head_dim, heads, dtype.itemsize)
    return kept


def matmul_layers_within(model: nn.Module, budget_gb: float, tokens: int) -> int:
    """How many decoder layers' kept outputs fit in `budget_gb` (train.keep_matmuls_gb)."""
    return layers_within_budget(kept_output_bytes(model, tokens), len(decoder_layers(model)), budget_gb)


def layers_within_budget(per_layer: int, layers: int, budget_gb: float) -> int:
    """How many of `layers` layers costing `per_layer` bytes each fit in `budget_gb` GB (1e9);
    the rule of train.keep_matmuls_gb, shared by the trainer and `qlora plan`."""
    if per_layer == 0:  # a 16-bit base has no 4-bit matmuls to keep
        return 0
    return min(layers, int(budget_gb * 1e9 // per_layer))
