"""Peak memory and time of the GGUF export (`qlora.gguf_export.export_gguf`) on a ~1.1B model.

    .venv/bin/python benchmarks/gguf_export_rss.py                  # f16 and q8_0, TinyLlama shape
    .venv/bin/python benchmarks/gguf_export_rss.py --layers 4 --dtypes f16

A random bf16 checkpoint of `--shape` (default 1.1b, TinyLlama-1.1B's; cached by _shapes.py
in $QLORA_BENCH_CACHE) and a random r=16 adapter on every decoder linear, written by
`_shapes.py` in its own child, plus stories260K's tokenizer copied into the checkpoint folder
(512 tokens; the other rows of the 32000-row embedding become [PAD] tokens). Each export runs in a child process with
verification on (every tensor read back and compared with a fresh merge, so the merge runs
twice), and its peak RSS (VmHWM) is printed against the model and the largest tensor.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _child import gb, last_json, mb, run_child  # noqa: E402

ASSETS = HERE.parents[1] / "shared" / "assets"

CHILD = r"""
import json, sys, time, re
def status(key):
    return int(re.search(rf"^{key}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024
from qlora.gguf_export import export_gguf
import transformers, gguf  # what export_gguf imports lazily, so the baseline counts it
baseline = status("VmRSS")
t = time.perf_counter()
report = export_gguf(sys.argv[1], sys.argv[2], dtype=sys.argv[3])
print(json.dumps({"report": report, "baseline_rss": baseline, "peak_rss": status("VmHWM"),
                  "export_seconds": time.perf_counter() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="f16,q8_0", help="comma-separated GGUF types to export")
    ap.add_argument("--shape", default="1.1b", help="a shape of _shapes.py")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (default: the shape's own)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tmp", default=None, help="parent folder for the adapter and exports")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qlora-gguf-rss-", dir=args.tmp))
    try:
        t = time.perf_counter()
        facts = last_json(run_child([sys.executable, str(HERE / "_shapes.py"), args.shape, str(args.layers),
                                     str(args.rank), str(tmp / "adapter")])[0])
        for f in (ASSETS / "models" / "stories260K").glob("tokenizer*") if facts["synthetic"] else ():
            shutil.copy(f, Path(facts["base"]) / f.name)  # into our random checkpoint, never an asset
        print(f"checkpoint: {facts['params'] / 1e9:.3f}B params, {gb(facts['bytes'])} GB bf16 "
              f"(largest tensor {mb(facts['largest_tensor'])}); written in {time.perf_counter() - t:.0f}s",
              flush=True)
        for dtype in args.dtypes.split(","):
            child = last_json(run_child([sys.executable, "-c", CHILD, str(tmp / "adapter"),
                                         str(tmp / f"m-{dtype}.gguf"), dtype])[0])
            r = child["report"]
            print(f"{dtype}: {r['tensors']} tensors ({r['tensors_merged']} merged), file {gb(r['bytes'])} GB, "
                  f"{child['export_seconds']:.0f}s with verification; peak RSS {mb(child['peak_rss'])} "
                  f"(baseline after imports {mb(child['baseline_rss'])}): "
                  f"{child['peak_rss'] / facts['bytes']:.2f}x the bf16 model, above baseline "
                  f"{(child['peak_rss'] - child['baseline_rss']) / facts['largest_tensor']:.1f}x the largest "
                  f"tensor", flush=True)
            (tmp / f"m-{dtype}.gguf").unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
