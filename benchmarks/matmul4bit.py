"""One 4-bit linear, forward and input-gradient: bitsandbytes' CPU path vs qlora's tiles.

    python benchmarks/matmul4bit.py [--tokens 512] [--tile-rows 512]

For the Llama-2-7B and 1.3B weight shapes: best-of-6 milliseconds of `bnb.matmul_4bit`'s
forward (whole weight dequantized per call, then one GEMM) and of its backward (`grad @
dequantize(W)`), next to `qlora.quant`'s tiled forward (512 weight rows at a time) and input
gradient (512 weight columns at a time). It also checks that forwards and input gradients are
bitwise equal, and compares the input gradient's error against fp32 math with the row tiles'.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_ms(f, n: int = 6, warmup: int = 1, pick=min) -> float:
    """Milliseconds of `f()`: `pick` (min, or e.g. statistics.median) of n timed calls after
    `warmup` untimed ones."""
    for _ in range(warmup):
        f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * pick(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--tile-rows", type=int, default=None, help="override cpu_matmul.TILE_ROWS")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import bitsandbytes as bnb
    import torch
    from qlora import cpu_matmul, quant
    if args.tile_rows:
        cpu_matmul.TILE_ROWS, cpu_matmul.AMX_TILE_WEIGHTS = args.tile_rows, 0

    print("| weight (out x in) | bnb fwd ms | tiled fwd ms | bnb input-grad ms | tiled input-grad ms | fwd bitwise equal | input-grad bitwise equal "
          "| input-grad max error, row tiles / column tiles |")
    print("|---|---|---|---|---|---|---|---|")
    for out_f, in_f in [(11008, 4096), (4096, 11008), (4096, 4096), (5504, 2048), (2048, 5504)]:
        g = torch.Generator().manual_seed(0)
        layer = quant.empty_quant_linear(torch.nn.Linear(in_f, out_f, bias=False), "nf4", True, torch.bfloat16)
        quant.set_quantized_weight(layer, torch.randn(out_f, in_f, generator=g), torch.device("cpu"),
                                   torch.bfloat16)
        w, qs = layer.weight, layer.weight.quant_state
        x = torch.randn(args.tokens, in_f, generator=g).bfloat16()
        grad = torch.randn(args.tokens, out_f, generator=g).bfloat16()
        with torch.no_grad():
            ref = bnb.matmul_4bit(x, w.t(), quant_state=qs)
            ours = cpu_matmul._cpu_forward(x, w, None)
            ref_grad = grad @ bnb.functional.dequantize_4bit(w.data, qs).to(grad.dtype)
            our_grad = cpu_matmul._cpu_input_grad(grad, w, in_f)
            # the row tiles' bf16 partial sums (the fallback, and what came before column tiles)
            row_grad = cpu_matmul._cpu_input_grad_rows(grad, w, in_f, quant.absmax_f32(qs))
            exact = grad.float() @ bnb.functional.dequantize_4bit(w.data, qs).float()
            errors = [(g.float() - exact).abs().max().item() for g in (row_grad, our_grad)]
            row = [best_ms(lambda: bnb.matmul_4bit(x, w.t(), quant_state=qs)),
                   best_ms(lambda: cpu_matmul._cpu_forward(x, w, None)),
                   best_ms(lambda: grad @ bnb.functional.dequantize_4bit(w.data, qs).to(grad.dtype)),
                   best_ms(lambda: cpu_matmul._cpu_input_grad(grad, w, in_f))]
        print(f"| {out_f} x {in_f} | " + " | ".join(f"{v:.1f}" for v in row)
              + f" | {torch.equal(ref, ours)} | {torch.equal(ref_grad, our_grad)} "
              f"| {errors[0]:.3f} / {errors[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
