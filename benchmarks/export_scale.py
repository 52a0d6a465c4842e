"""Peak memory of `qlora export` with its layer-streamed verification, by model depth.

    nice -n 10 python benchmarks/export_scale.py --shapes 65b:2,65b:4,7b [--rank 8]

For each SHAPE[:LAYERS] (shapes in _shapes.py; LAYERS keeps the shape's widths with that
many decoder layers):

1. writes a random bf16 checkpoint of that shape and a random PEFT adapter with non-zero
   factors on every decoder linear (`_shapes.model_path`, `_shapes.write_random_adapter`), in
   a child process, never holding the model in memory;
2. runs `qlora.export.export(adapter, out, dtype=fp16)` (the function behind `qlora export`)
   with verification on, in a child process of its own, and reports its peak RSS twice: the
   child's own VmHWM and ru_maxrss from wait4, against the checkpoint's size;
3. deletes the export (and, unless --keep-checkpoints, the random checkpoint).

The parent imports nothing heavy: a child's peak starts from what it inherited, so each step
runs in a fresh interpreter. What is claimed from these figures: peak RSS does not grow with
depth (the 65B layer shape at 2 and 4 layers), and its size at full depth (Llama-2-7B).

`--prequantized` (65b shapes only): the base is a pre-quantized NF4 + double-quant checkpoint
written directly in that form (offload.py's writer; no 16-bit original exists), so the export
merges into its dequantized weights (base_checkpoint.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _child import gb, last_json, run_child  # noqa: E402

PREQUANTIZED = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import _shapes, offload
layers, rank, adapter = int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
base = offload.checkpoint(layers, log=lambda m: print(m, file=sys.stderr, flush=True))
n = _shapes.write_random_adapter(adapter, base, rank)
params = sum(__import__("math").prod(s) for s in _shapes.param_shapes(_shapes.llama_config("65b", layers)).values())
size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
print(json.dumps({"base": str(base), "synthetic": True, "linears": n, "params": params, "bytes": size}))
"""

EXPORT = r"""
import json, re, sys, time
def status(key):
    return int(re.search(rf"^{key}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024
from qlora.export import export  # imports torch, transformers, bitsandbytes, accelerate
baseline = status("VmRSS")
t = time.perf_counter()
report = export(sys.argv[1], sys.argv[2], dtype="fp16", verify=sys.argv[3] == "1",
                device=sys.argv[4] or None)
print(json.dumps({"report": report, "baseline_rss": baseline, "peak_rss": status("VmHWM"),
                  "export_seconds": time.perf_counter() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="65b:2,65b:4,7b", help="SHAPE[:LAYERS],... (shapes of _shapes.py)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--no-verify", action="store_true", help="measure the merge and write alone")
    ap.add_argument("--device", default="", help="export --device (default: CUDA when available)")
    ap.add_argument("--tmp", default=None, help="parent folder for the adapters and exports")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep the random checkpoints in the cache (QLORA_BENCH_CACHE) for a rerun")
    ap.add_argument("--prequantized", action="store_true",
                    help="65b shapes: a base written directly in pre-quantized NF4 form (checkpoint GB is its size)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args()
    if args.prequantized and any(not s.startswith("65b:") for s in args.shapes.split(",")):
        raise SystemExit("--prequantized: only 65b:LAYERS shapes (offload.py writes that form)")

    rows = []
    for spec in args.shapes.split(","):
        shape, _, layers = spec.partition(":")
        tmp = Path(tempfile.mkdtemp(prefix="qlora-export-scale-", dir=args.tmp))
        try:
            t = time.perf_counter()
            writer = ([sys.executable, "-c", PREQUANTIZED, str(HERE), layers] if args.prequantized
                      else [sys.executable, str(HERE / "_shapes.py"), shape, layers or "0"])
            facts = last_json(run_child([*writer, str(args.rank), str(tmp / "adapter")])[0])
            print(f"{spec}: {facts['params'] / 1e9:.3f}B params, {gb(facts['bytes'])} GB on disk; adapter r "
                  f"{args.rank} on {facts['linears']} linears ({time.perf_counter() - t:.0f}s to write)", flush=True)
            out, maxrss = run_child([sys.executable, "-c", EXPORT, str(tmp / "adapter"), str(tmp / "out"),
                                     "0" if args.no_verify else "1", args.device])
            child = last_json(out)
            r = child["report"]
            row = {"shape": spec, "params": facts["params"], "checkpoint_bytes": facts["bytes"],
                   "peak_rss": child["peak_rss"], "ru_maxrss": maxrss, "baseline_rss": child["baseline_rss"],
                   "export_seconds": child["export_seconds"], "verify_seconds": r.get("verify_seconds"),
                   "device": r["device"], "relative_error": r.get("relative_error"),
                   "scale_error": r.get("scale_error"), "worst_layer_error": max(r.get("layer_errors") or [0]),
                   "fp16_max_activation": r.get("fp16_max_activation")}
            rows.append(row)
            print(f"{spec}: peak RSS {gb(row['peak_rss'])} GB (ru_maxrss {gb(maxrss)}; after imports "
                  f"{gb(row['baseline_rss'])}), {row['export_seconds']:.0f}s"
                  + (f" of which verification {row['verify_seconds']:.0f}s; logits error "
                     f"{row['relative_error']:.2%} of the adapter's change (projection "
                     f"{row['scale_error']:+.2%}), worst layer {row['worst_layer_error']:.2%}"
                     if row["verify_seconds"] is not None else ""), flush=True)
            if facts["synthetic"] and not args.keep_checkpoints:  # never the real stories260K
                shutil.rmtree(facts["base"], ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nqlora export --dtype fp16{' --no-verify' if args.no_verify else ''}, adapter r {args.rank}, "
          f"{'pre-quantized NF4 base, ' if args.prequantized else ''}"
          f"device {rows[0]['device'] if rows else '?'}")
    print("| shape | params | checkpoint GB | peak RSS GB (VmHWM) | ru_maxrss GB | export s | of which verify s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['params'] / 1e9:.2f}B | {gb(r['checkpoint_bytes'])} | {gb(r['peak_rss'])} | "
              f"{gb(r['ru_maxrss'])} | {r['export_seconds']:.0f} | "
              f"{'' if r['verify_seconds'] is None else round(r['verify_seconds'])} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
