"""Peak memory of `qlora.export.export` on a ~1.1B-parameter model (a script, not a test).

    .venv/bin/python benchmarks/export_rss.py            # TinyLlama shape, ~2.2 GB of bf16
    .venv/bin/python benchmarks/export_rss.py --layers 4 # quicker look

1. Writes a random Llama checkpoint (hidden 2048, 22 layers, FFN 5632, vocab 32000, 32 heads,
   4 KV heads: TinyLlama-1.1B's shape) in bf16 into a temporary folder, shard by shard:
   each tensor is generated from its own seed and the current shard is saved and freed once
   it reaches --shard-gb, so the whole model is never in memory here either.
2. Writes a random PEFT-format adapter, r=16 on every decoder linear.
3. Runs the export (fp16, merged into the dequantized NF4 base, verification off: it would
   load the model) in a child process, so its RSS is not inflated by step 1, and prints the
   child's peak RSS (its own VmHWM, and ru_maxrss from wait4) against the largest shard and
   the largest single tensor. The temporary folder is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time, re
def status(key):
    return int(re.search(rf"^{key}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024
from qlora.export import export  # imports torch, transformers, bitsandbytes, accelerate
baseline = status("VmRSS")
t = time.perf_counter()
report = export(sys.argv[1], sys.argv[2], dtype="fp16", max_shard_size=sys.argv[3], verify=False)
print(json.dumps({"report": report, "baseline_rss": baseline, "peak_rss": status("VmHWM"),
                  "export_seconds": time.perf_counter() - t}))
"""


def gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def mb(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def write_checkpoint(path: Path, config, shard_bytes: int) -> dict:
    """Random bf16 checkpoint, one shard in memory at a time. Returns size facts."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    config.save_pretrained(path)
    with init_empty_weights(include_buffers=True):
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    names, current, size, largest_tensor, largest_shard, n_params = [], {}, 0, 0, 0, 0

    def flush():
        nonlocal current, size, largest_shard
        i = len(names) + 1
        name = f"model-{i:05d}-of-NNNNN.safetensors"
        save_file(current, str(path / name), metadata={"format": "pt"})
        names.append((name, list(current)))
        largest_shard = max(largest_shard, size)
        current, size = {}, 0

    for name, shape in shapes.items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name] = t
        size += nbytes
        n_params += t.numel()
        largest_tensor = max(largest_tensor, nbytes)
    flush()
    total = len(names)
    weight_map = {}
    for i, (tmp_name, keys) in enumerate(names, 1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        (path / tmp_name).rename(path / final)
        weight_map.update({k: final for k in keys})
    total_size = sum((path / f).stat().st_size for f in set(weight_map.values()))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    return {"params": n_params, "shards": total, "largest_shard": largest_shard,
            "largest_tensor": largest_tensor, "bytes": total_size}


def write_adapter(path: Path, base: Path, config, rank: int) -> int:
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from qlora.adapter import PREFIX, peft_config
    from qlora.lora import LoraSettings
    from qlora.model import target_linears
    with init_empty_weights(include_buffers=True):
        linears = target_linears(AutoModelForCausalLM.from_config(config))
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, lin in linears.items():
        state[f"{PREFIX}{name}.lora_A.weight"] = (torch.randn(rank, lin.in_features, generator=g) * 0.02).bfloat16()
        state[f"{PREFIX}{name}.lora_B.weight"] = (torch.randn(lin.out_features, rank, generator=g) * 0.01).bfloat16()
    path.mkdir(parents=True)
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({n.rsplit(".", 1)[-1] for n in linears})
    cfg = peft_config(LoraSettings(r=rank, alpha=2 * rank), targets, str(base))
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return len(linears)


def write_inputs(tmp: Path, args) -> dict:
    """Step 1 (run in its own process): the random checkpoint and adapter."""
    from transformers import LlamaConfig
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    facts = write_checkpoint(tmp / "base", config, int(args.shard_gb * 2**30))
    facts["linears"] = write_adapter(tmp / "adapter", tmp / "base", config, args.rank)
    return facts


def run_child(argv: list[str]) -> tuple[str, int]:
    """Run a child to completion; (its stdout, its own peak RSS in bytes, from wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(argv[1:3])} failed:\n{err.read()[-4000:]}")
        return out.read(), usage.ru_maxrss * 1024  # kB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shard-gb", type=float, default=1.0, help="input shard size (GiB)")
    ap.add_argument("--max-shard-size", default="1GB", help="export's output shard size")
    ap.add_argument("--tmp", default=None, help="parent folder for the temporary files")
    ap.add_argument("--write-inputs", default=None, help=argparse.SUPPRESS)  # internal: step 1
    args = ap.parse_args()
    if args.write_inputs:
        print(json.dumps(write_inputs(Path(args.write_inputs), args)))
        return

    # This process imports nothing heavy: a child's peak RSS also counts the parent's memory
    # it started from (fork/vfork before exec), so the parent stays small and every step
    # runs in its own child.
    tmp = Path(tempfile.mkdtemp(prefix="qlora-export-rss-", dir=args.tmp))
    try:
        t = time.perf_counter()
        out, _ = run_child([sys.executable, __file__, "--write-inputs", str(tmp), *sys.argv[1:]])
        facts = json.loads(out.strip().splitlines()[-1])
        print(f"checkpoint: {facts['params'] / 1e9:.3f}B params, {gb(facts['bytes'])} bf16 in "
              f"{facts['shards']} shards (largest {gb(facts['largest_shard'])}, largest tensor "
              f"{mb(facts['largest_tensor'])}); adapter r={args.rank} on {facts['linears']} linears; "
              f"written in {time.perf_counter() - t:.0f}s", flush=True)

        t = time.perf_counter()
        out, maxrss = run_child([sys.executable, "-c", CHILD, str(tmp / "adapter"), str(tmp / "out"),
                                 args.max_shard_size])
        wall = time.perf_counter() - t
        child = json.loads(out.strip().splitlines()[-1])
        r = child["report"]
        out_largest = max((tmp / "out" / f).stat().st_size for f in r["files"] if f.endswith(".safetensors"))
        print(f"export: {r['tensors']} tensors, {r['tensors_merged']} merged, "
              f"{r['tensors_dequantized']} NF4 round-trips, {r['shards']} output shards "
              f"(largest {gb(out_largest)}), {child['export_seconds']:.0f}s in export(), "
              f"{wall:.0f}s with interpreter start")
        print(f"peak RSS of the export process: {mb(child['peak_rss'])} (VmHWM; wait4 ru_maxrss "
              f"{mb(maxrss)}), of which {mb(child['baseline_rss'])} is the interpreter after imports")
        print(f"  = {child['peak_rss'] / facts['largest_shard']:.2f}x the largest input shard "
              f"({gb(facts['largest_shard'])}), {child['peak_rss'] / facts['bytes']:.2f}x the model "
              f"({gb(facts['bytes'])}); above baseline: "
              f"{(child['peak_rss'] - child['baseline_rss']) / facts['largest_tensor']:.1f}x the "
              f"largest tensor ({mb(facts['largest_tensor'])})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
