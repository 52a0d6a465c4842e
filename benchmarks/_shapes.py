"""Benchmark model shapes, and random-weight Llama checkpoints written shard by shard.

The synthetic checkpoints are plain Hugging Face folders (config.json, bf16 safetensors
shards, model.safetensors.index.json) so that both stacks load them the way they load a real
model. The whole model is never held in memory: each tensor is generated from its own seeded
generator (std 0.02; norms are ones), appended to the current shard, and the shard is saved
and freed once it reaches SHARD_BYTES.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from pathlib import Path

import torch

# The real stories260K checkpoint, found the way the tests find assets: $QLORA_ASSETS, else
# shared/assets next to the checkout.
ASSETS = Path(os.environ.get("QLORA_ASSETS") or Path(__file__).resolve().parents[2] / "shared" / "assets")
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
}


def llama_config(shape: str):
    from transformers import LlamaConfig
    kw = SHAPES[shape]
    return LlamaConfig(vocab_size=32000, num_key_value_heads=kw["num_attention_heads"],
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, dtype="bfloat16", **kw)


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """{checkpoint tensor name: shape}, from the model class itself built on meta."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def count_params(path: Path) -> int:
    """Logical parameter count of a checkpoint folder (from safetensors headers; tied
    embeddings counted once, as they are stored once)."""
    from qlora.safetensors_io import checkpoint_files, read_header
    n = 0
    for f in checkpoint_files(path):
        for entry in read_header(f)[0].values():
            n += math.prod(entry["shape"])
    return n


def _tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * STD).to(torch.bfloat16)


def model_path(shape: str, log=print) -> Path:
    """Folder of the checkpoint for `shape`, writing it first if it is not cached."""
    if shape == "stories260K":
        return STORIES
    from safetensors.torch import save_file
    out = CACHE / shape
    config = llama_config(shape)
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
