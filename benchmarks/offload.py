"""65B-class QLoRA steps with the frozen base streamed from disk, layer by layer.

    python benchmarks/offload.py --layers 4,16 --seq 512 --rank 16 --steps 2 --warmup 1

A random checkpoint of the LLaMA-65B *layer* shape (hidden 8192, FFN 22016, 64 heads,
8 KV heads, vocab 32000; `_shapes.SHAPES["65b"]`) is written directly in bitsandbytes'
pre-quantized 4-bit form (NF4, double quantization; what `save_pretrained` of a 4-bit model
writes): random 4-bit codes and scales per linear, so no 130 GB 16-bit source is needed. It
goes to /tmp/qlora-bench/65b-<N>l-nf4 (QLORA_BENCH_CACHE), one shard per decoder layer.

Each depth trains in its own child process: `load_model(offload="disk", resident_layers=0)`
(every decoder layer streamed from the checkpoint file itself, two layers in memory at a
time), LoRA r on all linears, gradient checkpointing, paged AdamW 8-bit, batch 1, random
tokens. Per run: peak RSS (VmHWM, whole process), load time, step time, and per layer and
step the streamer's read time (IO, on its own thread) against the time the compute thread
waited for a layer. `--cold` asks the kernel to drop the checkpoint's page cache before every
step (posix_fadvise DONTNEED), so reads come from the disk instead of RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _shapes  # noqa: E402
from bench import RESULT, hwm_gb, matmul_probe, reset_hwm, rss_gb  # noqa: E402

BLOCKSIZE = 64  # bitsandbytes' 4-bit default, as qlora.quant uses
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- the checkpoint

def _packed_linear(name: str, shape: tuple[int, int], gen) -> dict:
    """A random NF4 + double-quant linear in bitsandbytes' serialization: uniform random
    codes (every NF4 level), per-block absmax ~0.05 (a std-0.02 weight's), and the absmax
    double-quantized as bitsandbytes' quantize_4bit does it."""
    import torch
    from bitsandbytes.functional import QuantState, get_4bit_type, quantize_blockwise
    n = shape[0] * shape[1]
    codes = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, generator=gen)
    absmax = 0.04 + 0.02 * torch.rand(n // BLOCKSIZE, generator=gen)
    offset = absmax.mean()
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
    qs = QuantState(absmax=qabsmax, shape=torch.Size(shape), code=get_4bit_type("nf4", device="cpu"),
                    blocksize=BLOCKSIZE, quant_type="nf4", dtype=torch.bfloat16,
                    offset=offset, state2=state2)
    out = {f"{name}": codes}
    for k, v in qs.as_dict(packed=True).items():
        out[f"{name}.{k}"] = v.clone()
    return out


def checkpoint(layers: int, log=print) -> Path:
    """Folder of the pre-quantized 65B-layer-shape checkpoint with `layers` layers (cached)."""
    import torch
    from safetensors.torch import save_file
    from qlora.atomic import write_atomically
    out = _shapes.CACHE / f"65b-{layers}l-nf4"
    config = _shapes.llama_config("65b", layers)
    config.quantization_config = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8"}
    want = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if (out / _shapes.DONE).is_file() and (out / _shapes.DONE).read_text() == want:
        return out
    shapes = _shapes.param_shapes(config)
    log(f"writing {out} ({layers} layers, pre-quantized NF4) ...")

    def write(tmp: Path) -> None:
        gen = torch.Generator().manual_seed(0)
        shards: list[dict] = [{}] + [{} for _ in range(layers)]
        names = [f"model-{i:05d}-of-{layers + 1:05d}.safetensors" for i in range(1, layers + 2)]
        weight_map = {}
        for i, shard in enumerate(shards):  # shard 0: embeddings, final norm, head
            prefix = f"model.layers.{i - 1}." if i else None
            for name, shape in shapes.items():
                mine = name.startswith(prefix) if prefix else not name.startswith("model.layers.")
                if not mine:
                    continue
                if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
                    shard.update(_packed_linear(name, shape, gen))
                else:
                    shard[name] = _shapes._tensor(name, shape)
            save_file(shard, str(tmp / names[i]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, names[i]))
            shards[i] = None  # free the layer's tensors before the next one
        total = sum((tmp / f).stat().st_size for f in names)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        config.save_pretrained(tmp)
        (tmp / _shapes.DONE).write_text(want)

    write_atomically(out, write)
    return out


def drop_page_cache(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- one run (child)

def worker(args) -> dict:
    import warnings
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported")
    import torch
    from qlora.config import LoraConfig
    from qlora.lora import add_lora
    from qlora.loss import lm_loss_sum
    from qlora.memory import release_if_grown, release_memory_per_layer
    from qlora.checkpointing import enable_gradient_checkpointing
    from qlora.model import decoder_layers, load_model
    from qlora.optim import build_optimizer

    path = checkpoint(args.worker_layers, log=lambda m: print(m, file=sys.stderr))
    probe_best, _ = matmul_probe(3.0)
    torch.manual_seed(0)
    reset_hwm()
    with tempfile.TemporaryDirectory(prefix="offload-", dir=args.offload_dir) as home:
        t0 = time.perf_counter()
        model = load_model(path, quantization="nf4", double_quant=True, compute_dtype="bfloat16",
                           device="cpu", offload="disk", offload_dir=home, resident_layers=0)
        load_s, load_peak = time.perf_counter() - t0, hwm_gb()
        add_lora(model, LoraConfig(r=args.rank, alpha=2 * args.rank, dropout=0.05,
                                   targets="all-linear", dtype="bfloat16"))
        enable_gradient_checkpointing(model)
        release_memory_per_layer(decoder_layers(model))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = build_optimizer(params, "paged_adamw_8bit", 1e-4, 0.0)
        streamer = model.qlora_streamer
        n_layers = len(decoder_layers(model))

        g = torch.Generator().manual_seed(1234)
        runs = []
        for i in range(args.warmup + args.steps):
            x = torch.randint(0, 32000, (1, args.seq), generator=g)
            if args.cold:
                drop_page_cache(path)
            before = (streamer.stats.io_seconds, streamer.stats.wait_seconds, streamer.stats.bytes)
            t0 = time.perf_counter()
            s, n = lm_loss_sum(model, {"input_ids": x, "labels": x})
            loss = s / n
            release_if_grown()
            loss.backward()
            opt.step()
            opt.zero_grad()
            release_if_grown()
            dt = time.perf_counter() - t0
            io = streamer.stats.io_seconds - before[0]
            wait = streamer.stats.wait_seconds - before[1]
            read = streamer.stats.bytes - before[2]
            print(f"  [{args.worker_layers} layers] step {i} {dt:.1f}s loss {loss.item():.4f} "
                  f"io {io:.1f}s wait {wait:.1f}s read {read / 1e9:.1f} GB rss {rss_gb():.2f} GB",
                  file=sys.stderr, flush=True)
            if i >= args.warmup:
                runs.append({"step_s": dt, "io_s": io, "wait_s": wait, "read_bytes": read})
        streamer.close()
    med = statistics.median(r["step_s"] for r in runs)
    io = statistics.median(r["io_s"] for r in runs)
    wait = statistics.median(r["wait_s"] for r in runs)
    return {
        "layers": n_layers, "seq": args.seq, "rank": args.rank, "cold": args.cold,
        "checkpoint_gb": sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9,
        "load_s": load_s, "load_peak_gb": load_peak, "run_peak_gb": hwm_gb(),
        "step_s": med, "per_layer_step_s": med / n_layers, "per_layer_io_s": io / n_layers,
        "per_layer_wait_s": wait / n_layers, "per_layer_compute_s": (med - wait) / n_layers,
        "read_gb_per_step": statistics.median(r["read_bytes"] for r in runs) / 1e9,
        "probe_bf16_tflops": probe_best / 1e12, "runs": runs,
    }


# ---------------------------------------------------------------- parent

def table(results: list[dict]) -> str:
    rows = ["| layers | checkpoint GB | load s | run peak RSS GB | step s | per layer: step s | IO s | "
            "waited s | compute s | read GB/step |", "|" + "---|" * 10]
    for r in results:
        rows.append(f"| {r['layers']} | {r['checkpoint_gb']:.1f} | {r['load_s']:.1f} | {r['run_peak_gb']:.2f} | "
                    f"{r['step_s']:.1f} | {r['per_layer_step_s']:.2f} | {r['per_layer_io_s']:.3f} | "
                    f"{r['per_layer_wait_s']:.3f} | {r['per_layer_compute_s']:.2f} | {r['read_gb_per_step']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="4,16", help="comma-separated depths")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="drop the checkpoint's page cache before each step")
    ap.add_argument("--offload-dir", default=None, help="where the streamer's scratch folder goes")
    ap.add_argument("--worker-layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    if a.worker_layers:
        print(RESULT + json.dumps(worker(a)), flush=True)
        return
    import subprocess
    results = []
    for n in [int(x) for x in a.layers.split(",")]:
        checkpoint(n)  # written here, so the child's peak is training alone
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker-layers", str(n), "--seq", str(a.seq),
                "--rank", str(a.rank), "--steps", str(a.steps), "--warmup", str(a.warmup)]
        argv += ["--cold"] if a.cold else []
        argv += ["--offload-dir", a.offload_dir] if a.offload_dir else []
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"worker failed (rc {proc.returncode}): {' '.join(argv)}\n{proc.stdout}")
        results.append(json.loads(lines[-1][len(RESULT):]))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "runs"}), flush=True)
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
