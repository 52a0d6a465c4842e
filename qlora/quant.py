"""4-bit weights through bitsandbytes: quantize one linear at a time, run it, dequantize it.

Everything that knows about bitsandbytes' NF4 layout lives here, so that loading, LoRA and
export share one definition of "the weight as training saw it".
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
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

from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary  # noqa: E402

try:  # the native CPU kernels' module; bitsandbytes may move it
    from bitsandbytes.backends.cpu import ops as _bnb_cpu_ops  # noqa: E402
except ImportError:
    _bnb_cpu_ops = None
_CTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

BLOCKSIZE = 64  # QLoRA's NF4 block size: one absmax per 64 weights
QUANT_TYPES = ("nf4", "fp4")


def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tile units (Linux lists them in /proc/cpuinfo's flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


# Weight rows dequantized at once on CPU (and quantized at once while loading): 8 MB of bf16
# at in_features 4096. Tiling every weight, even ones a whole-weight buffer would fit in the
# heap for, keeps the training peak low (1.3B: 1.83 GB instead of 2.18 GB whole,
# benchmarks/README.md). 1024, not 512: on AMX, oneDNN runs 512-wide tiles at about half the
# rate (7B forward 24 vs 48 ms, benchmarks/matmul4bit.py; the 1.3B step went from 69.7 to
# 89.9 tok/s, "#19 levers").
TILE_ROWS = 1024
# On AMX CPUs a GEMM's tile grows up to 2 * TILE_ROWS rows while it holds at most this many
# weights (8 MB of bf16): at 2048-wide layers the wider tiles made a 1.3B step 4% faster for
# the same peak RSS; at 65B's widths a 1024-row tile is already this big, and 2048 rows tied
# for 0.1 GB more (levers.py `tiles2048` row, offload.py). Without AMX it is 0 (no growth).
AMX_TILE_WEIGHTS = 2048 * 2048 if _cpu_has_amx() else 0


def absmax_f32(state: QuantState) -> torch.Tensor:
    """One fp32 scale per block; with double quantization the scales are themselves 8-bit."""
    if state.nested:
        return (bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return state.absmax.float()


def _row_tiles(n: int, rows: int):
    """Row ranges [a, b) of `rows` rows (the last one ragged) over n rows."""
    for a in range(0, n, rows):
        yield a, min(n, a + rows)


def _tile_height(blocksize: int, length: int = 0) -> int:
    """Rows per tile of a weight whose rows are `length` long (or columns per column tile,
    whose columns are `length` long): TILE_ROWS, grown on AMX CPUs up to twice that within
    AMX_TILE_WEIGHTS when `length` is given (GEMM tiles, not the loader's). Whole blocks, so
    every tile starts on a block edge."""
    rows = TILE_ROWS
    if length and AMX_TILE_WEIGHTS:
        rows = max(rows, min(2 * rows, AMX_TILE_WEIGHTS // length))
    return -(-rows // blocksize) * blocksize


def _weight_rows(packed, absmax, state: QuantState, k: int, dtype, a: int, b: int,
                 buf: torch.Tensor | None = None) -> torch.Tensor:
    """Rows a..b of the dequantized (n, k) weight, written into `buf` (>= b-a rows) when the
    CPU kernel allows it. `a` is a multiple of the block size, so its 4-bit codes and scales
    are contiguous slices of the packed weight and of absmax."""
    bs = state.blocksize
    codes, scales = packed[a * k // 2: -(-b * k // 2)], absmax[a * k // bs: -(-b * k // bs)]
    kernel = _cpu_dequantize_kernel(state.quant_type, dtype, k, bs)
    if buf is not None and kernel is not None:
        return _dequantize_into(kernel, codes, scales, buf[: b - a], bs)  # (b-a, k)
    tile = QuantState(absmax=scales, shape=torch.Size((b - a, k)),
                      code=state.code, blocksize=bs, quant_type=state.quant_type, dtype=dtype)
    return bnb.functional.dequantize_4bit(codes, tile)  # (b-a, k)


@functools.lru_cache(maxsize=None)  # looked up once per tile otherwise
def _cpu_dequantize_kernel(quant_type: str, dtype: torch.dtype, k: int, blocksize: int):
    """bitsandbytes' native CPU dequantize kernel (the one its CPU `dequantize_4bit` op
    calls), so that tiles can be written into one reused buffer; None where that op would
    not call it either (odd widths, huge blocks, no native library), and we use the op."""
    lib = getattr(_bnb_cpu_ops, "lib", None)
    name = f"cdequantize_blockwise_cpu_{quant_type}_{_CTYPE_NAMES.get(dtype)}"
    if (lib is None or isinstance(lib, ErrorHandlerMockBNBNativeLibrary) or k % 2
            or blocksize >= 2048 or not hasattr(lib, name)):
        return None
    return getattr(lib, name)


def _dequantize_into(kernel, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
                     blocksize: int) -> torch.Tensor:
    """Run the native kernel: contiguous 4-bit `codes` and fp32 `scales` -> contiguous (rows, k) `out`."""
    rows, k = out.shape
    kernel(*(ctypes.c_void_p(t.data_ptr()) for t in (codes, scales, out)),
           ctypes.c_longlong(blocksize), ctypes.c_longlong(rows), ctypes.c_longlong(k))
    return out


def _cpu_forward(x2: torch.Tensor, weight: Params4bit, bias: torch.Tensor | None,
                 lora_in: torch.Tensor | None = None, lora_B: torch.Tensor | None = None) -> torch.Tensor:
    """`x2 @ W.T + bias` with W dequantized one row tile (`_tile_height`) at a time; with an
    adapter, `+ lora_in @ lora_B.T` (its r-wide input (M, r) and B (n, r)) in the same tiles.

    Why tiles: bitsandbytes' CPU path dequantizes the whole weight per call. At 7B an MLP
    weight is 90 MB of bf16, above glibc's mmap threshold, so every call page-faults fresh
    memory (forward 84 ms vs 64 ms tiled at 11008 x 4096, benchmarks/matmul4bit.py), and
    90 MB more peak memory. Every tile is written into one buffer of a few MB, so a call
    allocates it once, not once per tile. Each output column is the same bf16 GEMM as
    bitsandbytes', so the result is bitwise `bnb.matmul_4bit`'s where the GEMM's rounding does
    not depend on its width (CPUs without AMX); on AMX oneDNN rounds by shape, so it equals
    bitsandbytes' to bf16 rounding, not bitwise (`benchmarks/matmul4bit.py`).

    Why the adapter rides along: a separate `lora_in @ B.T` writes a fresh (M, n) output and the
    sum reads it back, two memory-bound passes per call. Here the thin GEMM writes the output
    tile and the base GEMM accumulates onto it while it is in cache (6-10% of a 1.3B step:
    benchmarks/levers.py, `fused` row).
    """
    state, (m, k), n = weight.quant_state, x2.shape, weight.quant_state.shape[0]
    packed, absmax = weight.data.view(-1), absmax_f32(state)
    y = x2.new_empty(m, n)  # (M, n)
    rows = _tile_height(state.blocksize, k)
    buf = x2.new_empty(min(n, rows), k)  # one tile buffer per call, not per tile
    for a, b in _row_tiles(n, rows):
        w = _weight_rows(packed, absmax, state, k, x2.dtype, a, b, buf)  # (b-a, k)
        yt = y[:, a:b]  # (M, b-a), this tile's output columns
        if lora_in is not None:
            _lora_columns(lora_in, lora_B, a, b, yt)  # yt = lora_in @ B[a:b].T
            yt.addmm_(x2, w.t())
            if bias is not None:
                yt.add_(bias[a:b])
        elif bias is None:
            torch.mm(x2, w.t(), out=yt)
        else:  # fused like F.linear, so the bias is rounded in once, as bitsandbytes does
            torch.addmm(bias[a:b], x2, w.t(), out=yt)
    return y


def _lora_columns(lora_in: torch.Tensor, lora_B: torch.Tensor, a: int, b: int, out: torch.Tensor) -> None:
    """out = lora_in @ lora_B[a:b].T: output columns a..b of the adapter's up projection,
    computed in the factors' dtype (fp32 factors: an fp32 GEMM, rounded once into `out`)."""
    if lora_in.dtype == out.dtype:
        torch.mm(lora_in, lora_B[a:b].t(), out=out)
    else:
        out.copy_(lora_in @ lora_B[a:b].t())


def _cpu_input_grad(g2: torch.Tensor, weight: Params4bit, k: int) -> torch.Tensor:
    """`g2 @ W` (M, k), one column tile of W at a time.

    Each column tile is a full-depth GEMM over all n rows of W, so every output element is
    rounded to bf16 once, as in `g2 @ dequantize(W)` (the row tiles' bf16 partial sums had
    2.5-7x its error, benchmarks/matmul4bit.py). The tile's 4-bit
    codes and scales are strided in W's layout and are first gathered into small buffers,
    unless one tile is all of W (every weight up to AMX_TILE_WEIGHTS on AMX, e.g. 1.3B's
    attention): then they are read where they are.
    Widths that do not split into whole blocks per row take the row tiles instead.
    """
    state, n = weight.quant_state, weight.quant_state.shape[0]
    bs, absmax = state.blocksize, absmax_f32(state)
    kernel = _cpu_dequantize_kernel(state.quant_type, g2.dtype, k, bs)
    if kernel is None or k % bs:
        return _cpu_input_grad_rows(g2, weight, k, absmax)
    codes, scales = weight.data.view(n, k // 2), absmax.view(n, k // bs)  # row-major, per row
    cols = min(k, _tile_height(bs, n))
    gx = g2.new_empty(g2.shape[0], k)  # (M, k)
    w_buf = g2.new_empty(n * cols)
    if cols == k:  # one tile, already contiguous
        torch.mm(g2, _dequantize_into(kernel, codes, scales, w_buf.view(n, k), bs), out=gx)
        return gx
    codes_buf = codes.new_empty(n * cols // 2)
    scales_buf = scales.new_empty(n * cols // bs)
    for c in range(0, k, cols):
        d = min(k, c + cols)
        tile_codes = codes_buf[: n * (d - c) // 2].view(n, (d - c) // 2)
        tile_codes.copy_(codes[:, c // 2: d // 2])
        tile_scales = scales_buf[: n * (d - c) // bs].view(n, (d - c) // bs)
        tile_scales.copy_(scales[:, c // bs: d // bs])
        w = _dequantize_into(kernel, tile_codes, tile_scales, w_buf[: n * (d - c)].view(n, d - c), bs)
        torch.mm(g2, w, out=gx[:, c:d])  # w = W[:, c:d]
    return gx


def _cpu_input_grad_rows(g2: torch.Tensor, weight: Params4bit, k: int, absmax) -> torch.Tensor:
    """`g2 @ W` accumulated over W's row tiles (partial sums rounded to bf16 per tile)."""
    state, n = weight.quant_state, weight.quant_state.shape[0]
    packed = weight.data.view(-1)
    rows = _tile_height(state.blocksize, k)
    gx, buf = None, g2.new_empty(min(n, rows), k)
    for a, b in _row_tiles(n, rows):
        w = _weight_rows(packed, absmax, state, k, g2.dtype, a, b, buf)
        gx = g2[:, a:b] @ w if gx is None else gx.addmm_(g2[:, a:b], w)
    return gx


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
            y = _cpu_forward(x.reshape(-1, x.shape[-1]), weight, bias, a2, lora_B)
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
                gx = _cpu_input_grad(g2, weight, x_shape[-1])
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
    the layout that export and state dicts expect. We run the tiled CPU matmul above (same
    numbers), bitsandbytes' kernels on CUDA, and can keep outputs for selective checkpointing.
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
    Blocks are independent, so we quantize TILE_ROWS rows at a time and concatenate; the second
    level (scales of the scales) is computed once over all blocks, as bitsandbytes does.
    """
    n, k = w.shape
    parts = [torch.ops.bitsandbytes.quantize_4bit.default(w[a:b], BLOCKSIZE, quant_type, torch.uint8)
             for a, b in _row_tiles(n, _tile_height(BLOCKSIZE))]
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
