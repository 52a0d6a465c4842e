"""Before/after of each speed and memory lever, on one loaded model, in one process.

    python benchmarks/levers.py --shape 1.3b --seq 512 --steps 2 --warmup 1 --rounds 2

Loads OURS once (NF4, LoRA r16 alpha 32 dropout 0.05 on all linears, non-reentrant
checkpointing, PagedAdamW8bit lr 1e-4, the same loop as bench.py) and times a few steps per
configuration. Each configuration switches one lever back to what qlora did before it
(re-created here by patching the module attribute the lever lives in):

  tiled 4-bit matmul   -> bitsandbytes' whole-weight dequantize + GEMM per call
  16-bit dropout mask  -> a Bernoulli draw per element (what F.dropout does)
  release freed memory -> no malloc_trim in training steps at all
  release per layer    -> RSS checked (and the heap trimmed once it grew by
                          memory.LAYER_TRIM_BUDGET) only after the forward pass and after the
                          optimizer step, not also before each layer's forward and backward
  shared adapter input -> a dropout mask and an A GEMM per adapter, not one per q/k/v and
                          gate/up group (lora.fuse_shared_inputs false)
  numpy mask bits      -> the 16 bits per element drawn by torch's Mersenne Twister
                          (random_ on int64 words) instead of numpy's PCG64DXSM
  fused B GEMM         -> the adapter's B GEMM and the sum with the base output outside the
                          4-bit matmul, over the whole output (lora.lora_up)
  unread outputs       -> the recompute also runs down_proj's 4-bit matmul, whose output
                          only feeds the residual sum backward never reads
  keep matmul outputs  -> (off by default) train.keep_matmuls_gb large enough for every layer
  2048-row tiles       -> 1024-row GEMM tiles on AMX CPUs too (cpu_matmul.AMX_TILE_WEIGHTS 0;
                          without AMX this row is the default)
  head gradient in     -> the head + cross-entropy in checkpointed chunks, their gradient taken
  the loss's forward      in backward by autograd (recomputing the head's GEMM)
  mask threads         -> a dropout mask drawn from one numpy stream and compared by torch,
                          not from streams of lora.MASK_STREAM_WORDS in threads
  mask multiply        -> a bool mask applied with torch.where, not a mask in the input's
                          dtype that multiplies it (forward, recompute and backward)
  chunked 8-bit Adam   -> bitsandbytes' own optimizer step, one tensor at a time
                          (qlora.cpu_adam steps them in chunks; the same state either way)

"peak GB" is VmHWM after the configuration's steps, reset to the current RSS before them, so
it is comparable between rows of one run only. Random-weight shapes come from _shapes.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench import hwm_gb, reset_hwm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.3b")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="passes over all configurations")
    ap.add_argument("--lora-dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="lora.dtype of the adapters")
    ap.add_argument("--configs", default="all",
                    help="comma list of rows to run: default, tiled, mask, rng, shared, fused, unread, release, "
                         "layer-release, none, keep, tiles2048, head, maskthreads, where, adam "
                         "(the 'without ...' rows are named by their lever)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import bitsandbytes as bnb
    import numpy as np
    import torch

    import _shapes
    from qlora import checkpointing, cpu_matmul, lora, loss, memory, model as qmodel
    from qlora.config import LoraConfig
    from qlora.lora import add_lora
    from qlora.loss import lm_loss_sum
    from qlora.optim import build_optimizer

    path = _shapes.model_path(args.shape)
    torch.manual_seed(0)
    model = qmodel.load_model(path, device="cpu")
    add_lora(model, LoraConfig(r=16, alpha=32, dropout=0.05, dtype=args.lora_dtype))
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], "paged_adamw_8bit", 1e-4, 0.0)
    vocab = model.config.vocab_size
    layers = qmodel.decoder_layers(model)

    current = {
        "cpu_forward": cpu_matmul._cpu_forward, "cpu_input_grad": cpu_matmul._cpu_input_grad,
        "drop": lora.drop_unscaled, "release": memory.release_freed_memory,
        "forward": lora.LoRALinear.forward, "unread": checkpointing.mark_unread_outputs,
        "head": loss._fused}

    def torch_bits_drop(x, p):  # lora.drop_unscaled before its bits came from numpy
        with torch.profiler.record_function("qlora::dropout"):
            n = x.numel()
            bits = torch.empty((n + 3) // 4, dtype=torch.int64)
            bits.random_(-2**63, 2**63 - 1)
            r = bits.view(torch.int16)[:n].view(x.shape)
            return torch.where(r >= round(p * 65536) - 32768, x, 0)

    def one_stream_drop(x, p):  # lora.drop_unscaled before its mask came from threaded streams
        with torch.profiler.record_function("qlora::dropout"):
            n = x.numel()
            seed = int(torch.randint(0, 2**62, ()).item())
            r = torch.from_numpy(np.random.PCG64DXSM(seed).random_raw((n + 3) // 4)).view(torch.int16)[:n]
            return torch.where(r.view(x.shape) >= round(p * 65536) - 32768, x, 0)

    def where_drop(x, p):  # lora.drop_unscaled before its mask came in x's dtype
        with torch.profiler.record_function("qlora::dropout"):
            seed = int(torch.randint(0, 2**62, ()).item())
            return torch.where(lora.keep_mask(seed, x.numel(), p).view(x.shape), x, 0)

    def unfused_forward(self, x):  # LoRALinear.forward before the B GEMM moved into the tiles
        return lora.lora_up(self.base_layer(x), self.down(x), self.lora_B.weight)

    def never_unread(linears, inputs, out):  # before: the recompute ran every 4-bit matmul
        for m in linears:
            m.output_node, m.unread_in_recompute = None, False

    before = {
        # what bnb.matmul_4bit does on CPU: the whole weight dequantized per call
        "cpu_forward": lambda x2, w, bias: bnb.matmul_4bit(x2, w.t(), bias=bias, quant_state=w.quant_state),
        "cpu_input_grad": lambda g2, w, k: g2 @ bnb.functional.dequantize_4bit(w.data, w.quant_state).to(g2.dtype),
        # a Bernoulli draw per element and per adapter, as F.dropout
        "drop": lambda x, p: x * torch.empty_like(x).bernoulli_(1 - p),
        "release": lambda: None,
        "forward": unfused_forward,
        "unread": never_unread,
        "head": lambda head, h: False}  # before: checkpointed chunks, the head's gradient in backward
    hooks: list = []
    optimizer_step = [opt.step]

    amx_tiles = cpu_matmul.AMX_TILE_WEIGHTS

    def apply(off: set[str], keep: bool) -> None:
        cpu_matmul.AMX_TILE_WEIGHTS = 0 if "tiles2048" in off else amx_tiles
        cpu_matmul._cpu_forward = before["cpu_forward"] if "tiled" in off else current["cpu_forward"]
        cpu_matmul._cpu_input_grad = before["cpu_input_grad"] if "tiled" in off else current["cpu_input_grad"]
        lora.drop_unscaled = (before["drop"] if "mask" in off else torch_bits_drop if "rng" in off
                              else one_stream_drop if "maskthreads" in off
                              else where_drop if "where" in off else current["drop"])
        memory.release_freed_memory = before["release"] if "release" in off else current["release"]
        lora.LoRALinear.forward = before["forward"] if "fused" in off else current["forward"]
        if "shared" in off:
            lora.unshare_inputs(model)
        else:
            lora.share_inputs(model)
        checkpointing.mark_unread_outputs = before["unread"] if "unread" in off else current["unread"]
        loss._fused = before["head"] if "head" in off else current["head"]
        # bitsandbytes' Optimizer8bit.step, under the chunked step the class adds on CPU
        optimizer_step[0] = (lambda: bnb.optim.PagedAdamW8bit.step(opt)) if "adam" in off else opt.step
        checkpointing.enable_gradient_checkpointing(model, keep_matmul_layers=len(layers) if keep else 0)
        for h in hooks:
            h.remove()
        hooks[:] = [] if "layer-release" in off else memory.release_memory_per_layer(layers)
        model.train()

    def step(x) -> float:
        s, n = lm_loss_sum(model, {"input_ids": x, "labels": x})
        memory.release_if_grown()
        (s / n).backward()
        optimizer_step[0]()
        opt.zero_grad()
        memory.release_if_grown()
        return (s / n).item()

    all_configs = {  # key: (name, levers off, keep matmul outputs)
        "default": ("qlora default (all levers)", set(), False),
        "tiled": ("  without tiled 4-bit matmul", {"tiled"}, False),
        "mask": ("  without 16-bit dropout mask", {"mask"}, False),
        "shared": ("  without shared adapter inputs", {"shared"}, False),
        "rng": ("  without numpy mask bits", {"rng"}, False),
        "fused": ("  without B's GEMM in the 4-bit tiles", {"fused"}, False),
        "unread": ("  without skipping unread outputs in the recompute", {"unread"}, False),
        "release": ("  without release of freed memory", {"release", "layer-release"}, False),
        "layer-release": ("  without release per layer", {"layer-release"}, False),
        "none": ("none of the levers", {"tiled", "mask", "shared", "fused", "unread", "release",
                                         "layer-release", "tiles2048", "head", "maskthreads", "where", "adam"},
                 False),
        "keep": ("default + keep matmul outputs (all layers)", set(), True),
        "tiles2048": ("  without 2048-row tiles on AMX", {"tiles2048"}, False),
        "head": ("  without the head's gradient taken in the loss's forward", {"head"}, False),
        "maskthreads": ("  without dropout masks drawn in threads", {"maskthreads"}, False),
        "where": ("  without the mask multiply (torch.where)", {"where"}, False),
        "adam": ("  without the chunked 8-bit Adam step", {"adam"}, False),
    }
    keys = list(all_configs) if args.configs == "all" else args.configs.split(",")
    for k in keys:
        if k not in all_configs:
            raise SystemExit(f"--configs: unknown row {k!r} (choose from {', '.join(all_configs)})")
    configs = [all_configs[k] for k in keys]
    g = torch.Generator().manual_seed(1234)
    times: dict[str, list[float]] = {name: [] for name, *_ in configs}
    peaks: dict[str, float] = {}
    for rnd in range(args.rounds):  # round-robin, so that drifts in machine speed hit every row
        for name, off, keep in configs:
            apply(off, keep)
            current["release"]()  # the same start for every row
            reset_hwm()
            for i in range(args.warmup + args.steps):
                x = torch.randint(0, vocab, (1, args.seq), generator=g)
                t0 = time.perf_counter()
                step(x)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
            peaks[name] = max(peaks.get(name, 0.0), hwm_gb())
            print(f"round {rnd} {name:45s} steps {' '.join(f'{t:.2f}' for t in times[name][-args.steps:])}"
                  f"  peak {hwm_gb():.2f} GB", flush=True)
    rows = [(name, statistics.median(times[name]), peaks[name], times[name]) for name, *_ in configs]
    base = rows[0][1]
    print(f"\n{args.shape}, seq {args.seq}, batch 1, lora.dtype {args.lora_dtype}; per row and round {args.warmup} warm-up + "
          f"{args.steps} timed steps, {args.rounds} rounds; s/step = median of all timed steps")
    print("| configuration | s/step | tok/s | vs default | peak RSS GB |")
    print("|---|---|---|---|---|")
    for name, med, peak, _ in rows:
        print(f"| {name.strip()} | {med:.2f} | {args.seq / med:.1f} | {base / med:.2f}x | {peak:.2f} |")


if __name__ == "__main__":
    main()
