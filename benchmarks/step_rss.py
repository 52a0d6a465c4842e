"""Where a training step's memory peak happens: resident memory sampled per decoder layer.

    python benchmarks/step_rss.py --shape 7b --steps 3 [--layers 6] [--no-layer-release]

Loads OURS as bench.py does (NF4, LoRA r16 on all linears, dropout 0.05, checkpointing,
PagedAdamW8bit, the same step), samples RSS every 5 ms from a thread while the steps run, and
labels each sample with the phase it fell in: `fwdI` from layer I's forward on, `bwdI` from
the start of layer I's backward (recompute included) on. It prints each step's peak and, for
the last step, the peak of every phase: a peak that climbs layer after layer is memory the
heap does not reuse. `--layers N` keeps the shape's widths with N layers (a cheaper 7B
stand-in); `--no-layer-release` leaves out `memory.release_memory_per_layer`.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--layers", type=int, help="the shape's widths with this many layers")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--no-layer-release", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    bench._imports()
    import torch

    import _shapes
    from qlora import memory
    from qlora.model import decoder_layers

    shape = f"{args.shape}-{args.layers}l" if args.layers else args.shape
    if args.no_layer_release:
        memory.release_memory_per_layer = lambda layers: []  # what setup_ours calls
    torch.manual_seed(0)
    base = bench.rss_gb()
    model, _, step, _, load_peak = bench.setup_ours(_shapes.model_path(args.shape, layers=args.layers), 16, 0.0, args.seq)
    print(f"{shape}: RSS after imports {base:.2f} GB, load peak {load_peak:.2f} GB, "
          f"after setup {bench.rss_gb():.2f} GB", flush=True)

    phase, samples, done = ["step"], [], [False]
    for i, layer in enumerate(decoder_layers(model)):
        layer.register_forward_pre_hook(lambda m, a, i=i: phase.__setitem__(0, f"fwd{i}"))
        layer.register_forward_hook(lambda m, a, out, i=i: _on_backward(out, phase, f"bwd{i}"))

    def sample():
        while not done[0]:
            samples.append((bench.rss_gb(), phase[0]))
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    g = torch.Generator().manual_seed(1234)
    for s in range(args.steps):
        x = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=g)
        first, phase[0] = len(samples), "step"
        t0 = time.perf_counter()
        step(x)
        dt = time.perf_counter() - t0
        mine = samples[first:]
        print(f"step {s}: {dt:.1f} s, peak {max(r for r, _ in mine):.3f} GB in "
              f"{max(mine)[1]}, RSS after {bench.rss_gb():.3f} GB", flush=True)
    done[0] = True
    peaks: dict[str, float] = {}
    for r, p in mine:
        peaks[p] = max(peaks.get(p, 0.0), r)
    print("last step, peak GB per phase: " + " ".join(f"{p} {v:.3f}" for p, v in peaks.items()))


def _on_backward(out, phase, label) -> None:
    out = out[0] if isinstance(out, tuple) else out
    if out.requires_grad:
        out.register_hook(lambda g: phase.__setitem__(0, label))


if __name__ == "__main__":
    main()
