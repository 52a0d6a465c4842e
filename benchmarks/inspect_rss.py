"""Time and peak memory of `qlora inspect` on a Llama-2-7B-shape base (a script, not a test).

    .venv/bin/python benchmarks/inspect_rss.py                 # 7b, r 8 vs r 64, all three modes
    .venv/bin/python benchmarks/inspect_rss.py --shape 1.3b --modes none

1. The random bf16 checkpoint of `--shape` from benchmarks/_shapes.py (cached in
   $QLORA_BENCH_CACHE, default /tmp/qlora-bench; written shard by shard on first use).
2. Two random PEFT-format adapters on every decoder linear (ranks `--ranks`, bf16 factors).
3. For each mode, in a fresh child process: `inspect_adapters(r_small, r_large, ...)` with no
   base ("none": singular values, effective ranks, φ and heat-maps only), with the base's
   original weights ("original") and with the NF4 round trip training saw ("dequantized").
   Prints the seconds inside `inspect_adapters` and the child's peak RSS (VmHWM) against the
   interpreter's RSS after imports, the adapters' size and the largest base tensor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _child import mb, run_child  # noqa: E402
from _shapes import SHAPES, llama_config, model_path, write_random_adapter  # noqa: E402

CHILD = r"""
import json, re, sys, time
def status(key):
    return int(re.search(rf"^{key}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024
from qlora.inspect_adapter import inspect_adapters
import matplotlib.figure, matplotlib.backends.backend_agg  # imported before the baseline too
baseline = status("VmRSS")
a, b, out, base, mode = sys.argv[1:6]
t = time.perf_counter()
report = inspect_adapters(a, b, out=out, base=None if mode == "none" else base,
                          base_weights="original" if mode == "none" else mode)
print(json.dumps({"seconds": time.perf_counter() - t, "baseline_rss": baseline,
                  "peak_rss": status("VmHWM"), "layers": len(report.layers),
                  "files": len(report.files)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--ranks", type=int, nargs=2, default=[8, 64])
    ap.add_argument("--modes", nargs="+", default=["none", "original", "dequantized"],
                    choices=["none", "original", "dequantized"])
    ap.add_argument("--tmp", default=None, help="parent folder for the adapters")
    args = ap.parse_args()

    base = model_path(args.shape)
    config = llama_config(args.shape)
    largest = max(config.intermediate_size, config.vocab_size) * config.hidden_size * 2
    tmp = Path(tempfile.mkdtemp(prefix="qlora-inspect-rss-", dir=args.tmp))
    try:
        adapters = []
        for r in args.ranks:
            write_random_adapter(tmp / f"r{r}", base, r)
            adapters.append(tmp / f"r{r}")
        size = sum((p / "adapter_model.safetensors").stat().st_size for p in adapters)
        print(f"{args.shape} base {base}; adapters r={args.ranks[0]} and r={args.ranks[1]} on every "
              f"decoder linear, {mb(size)} of bf16 factors; largest base tensor {mb(largest)}", flush=True)
        for mode in args.modes:
            t = time.perf_counter()
            out, _ = run_child([sys.executable, "-c", CHILD, *map(str, adapters),
                                str(tmp / f"out-{mode}"), str(base), mode])
            child = json.loads(out.strip().splitlines()[-1])
            print(f"base {mode:<11}: {child['layers']} layers, {child['files']} files, "
                  f"{child['seconds']:.1f}s in inspect_adapters ({time.perf_counter() - t:.0f}s with "
                  f"interpreter start); peak RSS {mb(child['peak_rss'])} "
                  f"({mb(child['peak_rss'] - child['baseline_rss'])} above the "
                  f"{mb(child['baseline_rss'])} after imports)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
