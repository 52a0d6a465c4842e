"""4-bit weights through bitsandbytes: quantize one linear at a time, run it, dequantize it.

Everything that knows about bitsandbytes' NF4 layout lives here, so that loading, LoRA and
export share one definition of "the weight as training saw it".
"""

from __future__ import annotations

import logging

import torch
from torch import nn

# bitsandbytes logs a warning at import on CPU when the optional `kernels` package is absent;
# it is noise for our users (the default CPU kernel is used), so keep it out of their terminal.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402
from bitsandbytes.nn import Linear4bit, Params4bit  # noqa: E402

BLOCKSIZE = 64  # QLoRA's NF4 block size: one absmax per 64 weights
QUANT_TYPES = ("nf4", "fp4")


class QuantLinear(Linear4bit):
    """A `bitsandbytes.nn.Linear4bit` whose forward always takes the plain 4-bit matmul.

    Why a subclass: on CPU, `Linear4bit.forward` in eval mode under no_grad repacks the weight
    in place for an AVX512 kernel that asserts `out_features % 32 == 0` (bitsandbytes 0.50.2),
    so generation with e.g. a 172-wide FFN crashes, and the repacked weight no longer matches
    the layout that export and state dicts expect. `bnb.matmul_4bit` is the same math without
    that detour, on every device.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in_features)
        w = self.weight
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = bnb.matmul_4bit(x.to(self.compute_dtype), w.t(), bias=bias, quant_state=w.quant_state)
        return y.to(x.dtype)  # (..., out_features)


def empty_quant_linear(linear: nn.Linear, quant_type: str, double_quant: bool,
                       compute_dtype: torch.dtype) -> QuantLinear:
    """A meta-device QuantLinear with the shape of `linear`; its weight arrives later."""
    q = QuantLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    compute_dtype=compute_dtype, compress_statistics=double_quant,
                    quant_type=quant_type, device="meta")
    q.weight.blocksize = BLOCKSIZE
    return q


def set_quantized_weight(q: QuantLinear, weight: torch.Tensor, device: torch.device,
                         source_dtype: torch.dtype) -> None:
    """Quantize a full-precision (out, in) weight into `q`, on `device`.

    The weight is first cast to `source_dtype` (the compute dtype) because that is what
    `transformers` + `BitsAndBytesConfig` quantizes from; the same input gives bitwise the
    same NF4 codes and absmax, so our base equals the reference stack's base.
    """
    w = weight.to(device=device, dtype=source_dtype).contiguous()
    packed, state = bnb.functional.quantize_4bit(
        w, blocksize=BLOCKSIZE, compress_statistics=q.weight.compress_statistics,
        quant_type=q.weight.quant_type, quant_storage=torch.uint8)
    q.weight = Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                          compress_statistics=q.weight.compress_statistics,
                          quant_type=q.weight.quant_type, quant_storage=torch.uint8,
                          module=q, bnb_quantized=True)
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
    packed, state = bnb.functional.quantize_4bit(
        w, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type,
        quant_storage=torch.uint8)
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
