"""QLoRA training on one CUDA GPU: qlora (OURS) vs transformers + peft + bitsandbytes (REFERENCE).

    python benchmarks/cuda_bench.py --shapes 1.3b,7b --seqs 512,2048 --ranks 16,64 --steps 5 --warmup 2

The same setup as bench.py (its `setup_ours` / `setup_reference`: NF4 double-quant base, bf16
LoRA on every decoder linear with alpha = 2r and dropout 0.05, gradient checkpointing,
PagedAdamW8bit at lr 1e-4, batch 1, the same random token batches), on the GPU. Each stack
and rank runs in its own child process, so allocator figures do not mix; inside it, the
sequence lengths run in increasing order.

Figures per run:
  load s       the model-loading call alone (load_model / from_pretrained), to the GPU
  tok/s        median over the timed steps of seq / (forward + backward + optimizer step)
  peak GiB     torch.cuda.max_memory_reserved over that sequence length's steps (the
               allocator's cache is emptied and the peak reset first), plus paged optimizer
               state in managed memory, which the allocator does not see
  MFU          6 * params * tok/s over the bf16 peak measured at the start of the run (the
               best of an 8192^3 torch.matmul loop): bench.py's roofline convention; with a
               frozen base, forward + recompute + input gradient (2 * params each)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench  # noqa: E402  (setups, the child-process protocol)


def bf16_peak(seconds: float = 3.0) -> float:
    import torch
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while time.perf_counter() < end:
        start.record()
        a @ b
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return 2 * n**3 / best


def worker(args) -> dict:
    bench._imports()
    import torch
    import _shapes
    from qlora.optim import paged_bytes

    path = _shapes.model_path(args.shape)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    if args.worker == "reference":
        model, params, step, load_s, _ = bench.setup_reference(path, args.rank, device="cuda:0")
    else:
        model, params, step, load_s, _ = bench.setup_ours(path, args.rank, device="cuda:0")
    torch.cuda.synchronize()
    out = {"stack": args.worker, "shape": args.shape, "rank": args.rank, "load_s": load_s,
           "params": _shapes.count_params(path), "trainable": sum(p.numel() for p in params), "seqs": {}}
    g = torch.Generator().manual_seed(1234)
    for seq in args.seqs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            x = torch.randint(0, vocab, (1, seq), generator=g)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses.append(step(x))  # .item() waits for the GPU
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
        peak = (torch.cuda.max_memory_reserved() + paged_bytes()) / 2**30
        out["seqs"][str(seq)] = {"tok_s": seq / statistics.median(times), "step_s": times,
                                 "peak_gib": peak, "losses": losses}
        print(f"  [{args.worker} {args.shape} r{args.rank} seq {seq}] {seq / statistics.median(times):.0f} tok/s "
              f"peak {peak:.2f} GiB", file=sys.stderr, flush=True)
    return out


def table(results: list[dict], peak: float) -> str:
    rows = ["| shape | r | seq | stack | load s | tok/s | peak GiB | MFU | ours/ref tok/s | ours/ref peak |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["shape"], r["rank"], r["stack"]): r for r in results}
    for (shape, rank, stack), r in by.items():
        for seq, s in r["seqs"].items():
            ref = by.get((shape, rank, "reference"), {}).get("seqs", {}).get(seq)
            ratio = (f"{s['tok_s'] / ref['tok_s']:.2f}x | {s['peak_gib'] / ref['peak_gib']:.2f}x"
                     if ref and stack != "reference" else " | ")
            rows.append(f"| {shape} | {rank} | {seq} | {stack} | {r['load_s']:.1f} | {s['tok_s']:.0f} | "
                        f"{s['peak_gib']:.2f} | {100 * 6 * r['params'] * s['tok_s'] / peak:.1f}% | {ratio} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1.3b,7b")
    ap.add_argument("--seqs", default="512,2048")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--stacks", default="ours,reference")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.seqs = [int(s) for s in str(args.seqs).split(",")]
    if args.worker:
        print(bench.RESULT + json.dumps(worker(args)), flush=True)
        return
    import torch
    import _shapes
    peak = bf16_peak()
    device = torch.cuda.get_device_name()
    print(f"{device}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (8192^3, best of a 3 s loop)", flush=True)
    results = []
    for shape in args.shapes.split(","):
        _shapes.model_path(shape)  # written once, outside the timed children
        for rank in [int(r) for r in args.ranks.split(",")]:
            for stack in args.stacks.split(","):
                results.append(bench.run_child(
                    ["--worker", stack, "--shape", shape, "--rank", str(rank), "--seqs",
                     ",".join(map(str, args.seqs)), "--steps", str(args.steps), "--warmup", str(args.warmup)],
                    script=Path(__file__).resolve()))
    print(f"\n{device}, bf16 peak {peak / 1e12:.0f} TFLOP/s, torch {torch.__version__}\n")
    print(table(results, peak))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "bf16_peak": peak, "results": results}, indent=1))


if __name__ == "__main__":
    main()
