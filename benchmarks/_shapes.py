"""Benchmark model shapes, and random-weight Llama checkpoints and adapters on disk.

The synthetic checkpoints are plain Hugging Face folders (config.json, bf16 safetensors
shards, model.safetensors.index.json) so that both stacks load them the way they load a real
model. The whole model is never held in memory: each tensor is generated from its own seeded
generator (std 0.02; norms are ones), appended to the current shard, and the shard is saved
and freed once it reaches SHARD_BYTES. `model_path(shape, layers=N)` keeps a shape's widths
with N decoder layers (the 65B *layer* shape at 2 or 4 layers, say).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Real assets, found as the tests find them: $QLORA_ASSETS, else shared/assets next to the repo.
ASSETS = Path(os.environ.get("QLORA_ASSETS") or REPO.parent / "shared" / "assets")
STORIES = ASSETS / "models" / "stories260K"
CACHE = Path(os.environ.get("QLORA_BENCH_CACHE", "/tmp/qlora-bench"))
SHARD_BYTES = 2 * 1024**3
STD = 0.02
DONE = ".complete"  # written last: a folder without it is an interrupted write, redone

# name -> LlamaConfig kwargs (vocab 32000, untied head, MHA, like Llama-2)
SHAPES = {
    # 768 hidden, 12 layers; FFN 3072 brings it to ~162M (2048 would give ~134M)
    "170m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    # TinyLlama-like width on 24 layers: ~1.35B
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=5504),
    # Llama-2-7B: ~6.74B
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               intermediate_size=11008),
    # TinyLlama-1.1B: 22 layers, 4 KV heads
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, intermediate_size=5632),
    # the 65B-class layer (LLaMA-65B widths, 8 KV heads as in Llama-2-70B): ~0.69B per layer;
    # used with layers=N (model_path), 80 layers would be 65B
    "65b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, intermediate_size=22016),
}


def llama_config(shape: str, layers: int | None = None):
    from transformers import LlamaConfig
    kw = dict(SHAPES[shape])
    kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
    if layers:
        kw["num_hidden_layers"] = layers
    return LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16", **kw)


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """{checkpoint tensor name: shape}, from the model class itself built on meta."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def count_params(path: Path) -> int:
    """Logical parameter count of a checkpoint folder (from safetensors headers; tied
    embeddings counted once, as they are stored once)."""
    return checkpoint_facts(path)["params"]


def checkpoint_facts(path: Path) -> dict:
    """From the safetensors headers of a checkpoint folder: parameters, bytes on disk and
    the largest single tensor's bytes."""
    from qlora.safetensors_io import checkpoint_files, read_header
    files = checkpoint_files(path)
    params, largest = 0, 0
    for f in files:
        for entry in read_header(f)[0].values():
            params += math.prod(entry["shape"])
            begin, end = entry["data_offsets"]
            largest = max(largest, end - begin)
    return {"params": params, "bytes": sum(f.stat().st_size for f in files), "largest_tensor": largest}


def _tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * STD).to(torch.bfloat16)


def model_path(shape: str, log=print, layers: int | None = None) -> Path:
    """Folder of the checkpoint for `shape` (with `layers` decoder layers instead of the
    shape's own number, when given), writing it first if it is not cached."""
    if shape == "stories260K":
        return STORIES
    from safetensors.torch import save_file
    out = CACHE / (f"{shape}-{layers}l" if layers else shape)
    config = llama_config(shape, layers)
    want = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if (out / DONE).is_file() and (out / DONE).read_text() == want:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shapes = param_shapes(config)
    nparams = sum(math.prod(s) for s in shapes.values())
    log(f"[gen] writing random {shape} ({nparams / 1e9:.3f}B params, bf16) to {out}")
    # Shard names need the total up front; the byte total is known from the shapes.
    total_bytes = 2 * nparams
    n_shards = max(1, math.ceil(total_bytes / SHARD_BYTES))
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, idx = 0, 0

    def flush():
        nonlocal shard, size, idx
        idx += 1
        fname = f"model-{idx:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for k in shard:
            weight_map[k] = fname
        shard, size = {}, 0

    for name, shp in shapes.items():
        t = _tensor(name, shp)
        nb = t.numel() * 2
        if shard and size + nb > SHARD_BYTES:
            flush()
        shard[name] = t
        size += nb
    if shard:
        flush()
    if idx != n_shards:  # greedy packing can need one more shard than the byte bound
        for old_idx in range(1, idx + 1):
            old = f"model-{old_idx:05d}-of-{n_shards:05d}.safetensors"
            new = f"model-{old_idx:05d}-of-{idx:05d}.safetensors"
            os.replace(out / old, out / new)
        weight_map = {k: v.replace(f"-of-{n_shards:05d}", f"-of-{idx:05d}") for k, v in weight_map.items()}
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    (out / DONE).write_text(want)
    return out


def write_random_adapter(path: Path, base: Path, rank: int, seed: int = 0) -> int:
    """A PEFT-format adapter on every decoder linear of the checkpoint in `base`, with random
    non-zero factors (A std 0.02, B std 0.01, alpha = 2r: its delta is a few percent of a
    std-0.02 weight). Returns the number of adapted linears."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from qlora.adapter import PREFIX, peft_config
    from qlora.config import LoraConfig
    from qlora.model import target_linears
    with init_empty_weights(include_buffers=True):
        linears = target_linears(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, lin in linears.items():
        state[f"{PREFIX}{name}.lora_A.weight"] = (torch.randn(rank, lin.in_features, generator=g) * 0.02).bfloat16()
        state[f"{PREFIX}{name}.lora_B.weight"] = (torch.randn(lin.out_features, rank, generator=g) * 0.01).bfloat16()
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({n.rsplit(".", 1)[-1] for n in linears})
    cfg = peft_config(LoraConfig(r=rank, alpha=2 * rank), targets, str(base))
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return len(linears)


def main() -> None:
    """`python _shapes.py SHAPE LAYERS RANK ADAPTER_DIR` (LAYERS 0: the shape's own): the
    checkpoint (cached) and a random adapter on it; prints their facts as one JSON line. The
    benchmarks run this as a child so that writing never inflates a measured process."""
    import sys
    shape, layers, rank, adapter = sys.argv[1], int(sys.argv[2]) or None, int(sys.argv[3]), Path(sys.argv[4])
    base = model_path(shape, layers=layers, log=lambda m: print(m, file=sys.stderr, flush=True))
    n = write_random_adapter(adapter, base, rank)
    # "synthetic": a random checkpoint in CACHE, which a caller may delete; never a real asset
    print(json.dumps({"base": str(base), "synthetic": base != STORIES, "linears": n, **checkpoint_facts(base)}))


if __name__ == "__main__":
    main()
