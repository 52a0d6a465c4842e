"""4-bit weights through bitsandbytes: quantize one linear at a time, run it, dequantize it.

Everything that knows about bitsandbytes' NF4 layout lives here, so that loading, LoRA and
export share one definition of "the weight as training saw it".
"""

from __future__ import annotations

import collections
import contextlib
import logging

import torch
from torch import nn

# bitsandbytes logs a warning at import on CPU when the optional `kernels` package is absent;
# it is noise for our users (the default CPU kernel is used), so keep it out of their terminal.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402
from bitsandbytes.functional import QuantState  # noqa: E402
from bitsandbytes.nn import Linear4bit, Params4bit  # noqa: E402

from . import cpu_matmul  # noqa: E402

BLOCKSIZE = 64  # QLoRA's NF4 block size: one absmax per 64 weights
QUANT_TYPES = ("nf4", "fp4")


def absmax_f32(state: QuantState) -> torch.Tensor:
    """One fp32 scale per block; with double quantization the scales are themselves 8-bit."""
    if state.nested:
        return (bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return state.absmax.float()


class _Matmul4bit(torch.autograd.Function):
    """y = x @ W.T + bias [+ a @ lora_B.T] for a frozen 4-bit W; backward returns the input
    gradient and, with an adapter, the gradients of its r-wide input `a` and of B.

    `kept` is, during a checkpoint's recompute, this call's output kept by the original
    forward pass, or a stand-in for an output backward never reads (`checkpoint_phase`): it
    is returned as is, so the recompute costs no dequantization and no GEMM, while backward
    still flows through W and saves `a` and B as usual.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, kept, a, lora_B):  # x: (..., k), a: (..., r), lora_B: (n, r)
        ctx.weight, ctx.x_shape = weight, x.shape
        ctx.save_for_backward(a, lora_B)
        if kept is not None:
            return kept
        _attach_if_streamed(weight, +1)
        a2 = None if a is None else a.reshape(-1, a.shape[-1])  # (M, r)
        if x.device.type == "cpu":
            y = cpu_matmul._cpu_forward(x.reshape(-1, x.shape[-1]), weight, bias, a2, lora_B)
            return y.view(*x.shape[:-1], y.shape[-1])
        y = bnb.matmul_4bit(x, weight.t(), bias=bias, quant_state=weight.quant_state)
        if a is not None:
            y = y + (a @ lora_B.t()).to(y.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):  # grad: (..., n)
        weight, x_shape = ctx.weight, ctx.x_shape
        a, lora_B = ctx.saved_tensors
        _attach_if_streamed(weight, -1)
        g2 = grad.reshape(-1, grad.shape[-1])  # (M, n)
        gx = ga = gB = None
        if ctx.needs_input_grad[0]:
            if grad.device.type == "cpu":
                gx = cpu_matmul._cpu_input_grad(g2, weight, x_shape[-1])
            else:
                w = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(grad.dtype)
                gx = g2 @ w
            gx = gx.view(x_shape)
        if a is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5]):
            gf = g2.to(lora_B.dtype)  # as autograd casts the sum's gradient back to the factors
            if ctx.needs_input_grad[4]:
                ga = (gf @ lora_B).view(a.shape)  # (..., r)
            if ctx.needs_input_grad[5]:
                gB = gf.t() @ a.reshape(-1, a.shape[-1])  # (n, r)
        return gx, None, None, None, ga, gB  # base weight and bias are frozen


def _attach_if_streamed(weight: Params4bit, step: int) -> None:
    """An offloaded layer's codes are attached before it runs (offload.py's hooks); this
    covers what the hooks cannot see, such as a backward pass without checkpointing."""
    stream = getattr(weight, "_qlora_stream", None)
    if stream is not None and weight.data.numel() == 0:
        streamer, layer = stream
        streamer.use(layer, step)


# Which pass of a checkpointed decoder layer is running: None, "forward" or "recompute".
_PHASE: list[str | None] = [None]


def phase() -> str | None:
    """Which pass of a checkpointed decoder layer is running: None, "forward" or "recompute"."""
    return _PHASE[0]


def recomputing() -> bool:
    """True inside a checkpointed layer's recompute in backward. Module hooks check it: with
    transformers 5.17 a layer's hooks ran again in the recompute (seen on the GPU machine's
    image); 5.23 checkpoints `forward` and keeps them outside."""
    return _PHASE[0] == "recompute"


@contextlib.contextmanager
def checkpoint_phase(linears: list[QuantLinear], phase: str):
    """While active, a layer's 4-bit `linears` know which pass of gradient checkpointing
    runs them (a checkpoint context_fn pair, `qlora.checkpointing`): in "forward" those with
    `keep_outputs` keep their outputs, in "recompute" they hand the kept ones back and those
    whose output backward never reads (`unread_in_recompute`) skip their matmul."""
    if phase == "forward":
        for m in linears:
            m.kept.clear()  # leftovers of a forward whose backward never ran
    previous, _PHASE[0] = _PHASE[0], phase
    try:
        yield
    finally:
        _PHASE[0] = previous


class QuantLinear(Linear4bit):
    """A `bitsandbytes.nn.Linear4bit` whose forward never takes bitsandbytes' CPU eval path.

    Why a subclass: on CPU, `Linear4bit.forward` in eval mode under no_grad repacks the weight
    in place for an AVX512 kernel that asserts `out_features % 32 == 0` (bitsandbytes 0.50.2),
    so generation with e.g. a 172-wide FFN crashes, and the repacked weight no longer matches
    the layout that export and state dicts expect. We run the tiled CPU matmul of
    `qlora.cpu_matmul` (same numbers), bitsandbytes' kernels on CUDA, and can keep outputs for
    selective checkpointing.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_outputs = False  # selective checkpointing keeps this layer's outputs
        self.kept: collections.deque[torch.Tensor] = collections.deque()
        # Whether backward never reads this output's value, so the recompute may skip the
        # matmul (None until `qlora.checkpointing` has looked at the layer's first graph).
        self.unread_in_recompute: bool | None = None
        self.output_node = None  # the output's grad_fn, recorded for that one look

    def forward(self, x: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features). `lora` = (a, B): an adapter's r-wide
        input (..., r), already scaled, and its B (out_features, r), added inside the matmul."""
        dtype, phase = self.compute_dtype, _PHASE[0]
        bias = None if self.bias is None else self.bias.to(dtype)
        kept = None
        if phase == "recompute":
            if self.kept:
                kept = self.kept.popleft()
            elif self.unread_in_recompute:  # a stand-in of the right shape, never read
                kept = x.new_empty((), dtype=dtype).expand(*x.shape[:-1], self.out_features)
        a, lora_B = lora if lora is not None else (None, None)
        y = _Matmul4bit.apply(x.to(dtype), self.weight, bias, kept, a, lora_B)
        out = y.to(x.dtype)  # (..., out_features)
        if phase == "forward":
            if self.keep_outputs:
                self.kept.append(y.detach())
            if self.unread_in_recompute is None:
                self.output_node = out.grad_fn
        return out


def empty_quant_linear(linear: nn.Linear, quant_type: str, double_quant: bool,
                       compute_dtype: torch.dtype) -> QuantLinear:
    """A meta-device QuantLinear with the shape of `linear`; its weight arrives later."""
    q = QuantLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    compute_dtype=compute_dtype, compress_statistics=double_quant,
                    quant_type=quant_type, device="meta")
    q.weight.blocksize = BLOCKSIZE
    return q


def quantize_4bit(w: torch.Tensor, quant_type: str, double_quant: bool) -> tuple[torch.Tensor, QuantState]:
    """`bitsandbytes.functional.quantize_4bit(w, blocksize=64, ...)`, bitwise, in row tiles.

    The CPU quantizer holds several temporaries of the whole tensor (int64 bucket indices
    among them: ~7x its bf16 size, 0.6 GB for a 7B MLP weight), which set the loading peak.
    Blocks are independent, so we quantize `cpu_matmul.TILE_ROWS` rows at a time and
    concatenate; the second level (scales of the scales) is computed once over all blocks, as
    bitsandbytes does.
    """
    n, k = w.shape
    parts = [torch.ops.bitsandbytes.quantize_4bit.default(w[a:b], BLOCKSIZE, quant_type, torch.uint8)
             for a, b in cpu_matmul._row_tiles(n, cpu_matmul._tile_height(BLOCKSIZE))]
    packed = torch.cat([p for p, _ in parts])  # (n*k/2, 1) uint8, two codes per byte
    absmax = torch.cat([m for _, m in parts])  # (n*k/64,) fp32
    del parts
    code = bnb.functional.get_4bit_type(quant_type, device=w.device)
    if not double_quant:
        return packed, QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=BLOCKSIZE,
                                  code=code, quant_type=quant_type)
    offset = absmax.mean()
    qabsmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, QuantState(absmax=qabsmax, shape=w.shape, dtype=w.dtype, blocksize=BLOCKSIZE,
                              code=code, quant_type=quant_type, offset=offset, state2=state2)


def set_quantized_weight(q: QuantLinear, weight: torch.Tensor, device: torch.device,
                         source_dtype: torch.dtype) -> None:
    """Quantize a full-precision (out, in) weight into `q`, on `device`.

    The weight is first cast to `source_dtype` (the compute dtype) because that is what
    `transformers` + `BitsAndBytesConfig` quantizes from; the same input gives bitwise the
    same NF4 codes and absmax, so our base equals the reference stack's base.
    """
    w = weight.to(device=device, dtype=source_dtype).contiguous()
    packed, state = quantize_4bit(w, q.weight.quant_type, q.weight.compress_statistics)
    set_packed_weight(q, packed, state)


def set_packed_weight(q: QuantLinear, packed: torch.Tensor, state: QuantState) -> None:
    """Give `q` already-quantized codes (uint8 (n*k/2, 1)) and their QuantState."""
    q.weight = Params4bit(packed, requires_grad=False, quant_state=state, blocksize=state.blocksize,
                          compress_statistics=state.nested, quant_type=state.quant_type,
                          quant_storage=torch.uint8, module=q, bnb_quantized=True)
    q.quant_state = state


def nf4_roundtrip(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.bfloat16,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """The (out, in) weight as a 4-bit layer built from `weight` sees it (pure function).

    Bitwise what `dequantize(layer)` returns after `set_quantized_weight(layer, weight, ...)`
    with the same settings: same cast to `compute_dtype`, same blocksize, same bitsandbytes
    calls. Export uses it to merge LoRA into the weights training actually saw.
    """
    w = weight.to(device=device, dtype=compute_dtype).contiguous()
    packed, state = quantize_4bit(w, quant_type, double_quant)
    return bnb.functional.dequantize_4bit(packed, state).to(compute_dtype)


def dequantize(linear: nn.Module) -> torch.Tensor:
    """The (out, in) weight exactly as the forward pass sees it, in the compute dtype."""
    if isinstance(linear, Linear4bit):
        w = linear.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(linear.compute_dtype)
    return linear.weight.data


def quant_state_tensors(linear: Linear4bit) -> dict[str, torch.Tensor]:
    """The packed 4-bit weight plus its serialized quant state (bitsandbytes' own key names)."""
    out = {"weight": linear.weight.data}
    for k, v in linear.weight.quant_state.as_dict(packed=True).items():
        out[f"weight.{k}"] = v
    return out
