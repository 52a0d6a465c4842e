"""4-bit matmuls on CPU, one tile of the weight at a time: the forward GEMM in row tiles, the
input gradient in column tiles, each tile dequantized by bitsandbytes' native kernel into one
reused buffer. `quant._Matmul4bit` calls `_cpu_forward` and `_cpu_input_grad`; the loader's
quantizer uses the same row tiles.
"""

from __future__ import annotations

import ctypes
import functools

import torch

# quant.absmax_f32; quant imports this module too, so its names are looked up at call time
from . import quant

import bitsandbytes as bnb  # after quant, which quiets its CPU warning
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary
from bitsandbytes.functional import QuantState
from bitsandbytes.nn import Params4bit

try:  # the native CPU kernels' module; bitsandbytes may move it
    from bitsandbytes.backends.cpu import ops as _bnb_cpu_ops
except ImportError:
    _bnb_cpu_ops = None
_CTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


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
    packed, absmax = weight.data.view(-1), quant.absmax_f32(state)
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
    bs, absmax = state.blocksize, quant.absmax_f32(state)
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
