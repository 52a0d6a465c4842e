"""The sizes of a model that training memory depends on, read from config.json alone.

`qlora plan` must answer before anything is downloaded or loaded, so it reads only the
model's config.json: from the local folder when there is one, else from the facts below for
the models the bundled recipes name (their config.json is on the hub, often gated), else
downloaded alone from the hub when online.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import QloraError

# Families whose decoder block is Llama's: q/k/v/o projections, a gated MLP (gate, up, down),
# two RMSNorms, rotary positions. The plan's activation terms follow that block.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")

# config.json fields of the models in recipes/, as published on the hub (facts, not
# estimates): LLaMA 7B-65B (Touvron et al. 2023, Table 2; the FFN is 2/3 * 4 * hidden rounded
# up to a multiple of 256), Llama-2-7B, Llama-3.1-8B, Mistral-7B-v0.3.
_LLAMA1 = {"model_type": "llama", "vocab_size": 32000, "tie_word_embeddings": False,
           "torch_dtype": "float16"}
KNOWN_CONFIGS: dict[str, dict] = {
    "huggyllama/llama-7b": {**_LLAMA1, "hidden_size": 4096, "intermediate_size": 11008,
                            "num_hidden_layers": 32, "num_attention_heads": 32},
    "huggyllama/llama-13b": {**_LLAMA1, "hidden_size": 5120, "intermediate_size": 13824,
                             "num_hidden_layers": 40, "num_attention_heads": 40},
    "huggyllama/llama-30b": {**_LLAMA1, "hidden_size": 6656, "intermediate_size": 17920,
                             "num_hidden_layers": 60, "num_attention_heads": 52},
    "huggyllama/llama-65b": {**_LLAMA1, "hidden_size": 8192, "intermediate_size": 22016,
                             "num_hidden_layers": 80, "num_attention_heads": 64},
    "meta-llama/Llama-2-7b-hf": {**_LLAMA1, "hidden_size": 4096, "intermediate_size": 11008,
                                 "num_hidden_layers": 32, "num_attention_heads": 32,
                                 "num_key_value_heads": 32},
    "meta-llama/Llama-3.1-8B-Instruct": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "mistralai/Mistral-7B-Instruct-v0.3": {
        "model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
}
# The base models of those fine-tunes have the same shapes.
KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"] = KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"]
KNOWN_CONFIGS["mistralai/Mistral-7B-v0.3"] = KNOWN_CONFIGS["mistralai/Mistral-7B-Instruct-v0.3"]

LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linears of one decoder block, in the order its forward pass runs them."""


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder's sizes."""

    source: str
    """Where the sizes came from: a config.json path, or 'known: <hub id>'."""
    vocab: int
    """Vocabulary size (rows of the embeddings and of the output head)."""
    hidden: int
    """Width of the residual stream (hidden_size)."""
    intermediate: int
    """Width of the gated MLP (intermediate_size)."""
    layers: int
    """Decoder blocks (num_hidden_layers)."""
    heads: int
    """Query heads (num_attention_heads)."""
    kv_heads: int
    """Key/value heads (num_key_value_heads; fewer than heads with grouped-query attention)."""
    head_dim: int
    """Width of one head."""
    tied_embeddings: bool
    """The output head shares the embedding matrix (tie_word_embeddings)."""
    qkv_bias: bool
    """q/k/v projections have biases (Qwen2, or attention_bias)."""
    qk_norm: bool
    """Per-head RMSNorms on queries and keys (Qwen3)."""
    checkpoint_dtype: str
    """Dtype the checkpoint's tensors are stored in (torch_dtype), which loading reads."""

    def linears(self) -> dict[str, tuple[int, int]]:
        """{leaf name: (out_features, in_features)} of one decoder block."""
        q, kv, c, f = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (q, c), "k_proj": (kv, c), "v_proj": (kv, c), "o_proj": (c, q),
                "gate_proj": (f, c), "up_proj": (f, c), "down_proj": (c, f)}


def shape_from_config(config: dict, source: str) -> ModelShape:
    """A ModelShape from config.json's fields; errors name the field and `source`."""
    model_type = config.get("model_type")
    if model_type not in LLAMA_LIKE:
        raise QloraError(f"{source}: model_type {model_type!r} is not one qlora plan knows "
                         f"(Llama-style decoders: {', '.join(LLAMA_LIKE)})")

    def need(key: str) -> int:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise QloraError(f"{source}: {key}: expected a positive integer, got {value!r}")
        return value

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = config.get("head_dim") or hidden // heads
    return ModelShape(
        source=source, vocab=need("vocab_size"), hidden=hidden, intermediate=need("intermediate_size"),
        layers=need("num_hidden_layers"), heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        checkpoint_dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"))


def read_shape(name_or_path: str) -> ModelShape:
    """The shape of a local model folder, a model the bundled recipes name, or (online) a hub
    model whose config.json alone is downloaded."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise QloraError(f"{path}: not a model folder (no config.json)")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QloraError(f"{config_path}: cannot read model config ({e})") from None
        if not isinstance(config, dict):
            raise QloraError(f"{config_path}: expected a JSON object")
        return shape_from_config(config, str(config_path))
    if name_or_path in KNOWN_CONFIGS:
        return shape_from_config(KNOWN_CONFIGS[name_or_path], f"known: {name_or_path}")
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise QloraError(f"{name_or_path}: model path not found")
    return shape_from_config(_download_config(name_or_path), f"{name_or_path}/config.json")


def _download_config(repo_id: str) -> dict:
    from huggingface_hub import hf_hub_download  # only for models neither local nor known
    try:
        return json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text(encoding="utf-8"))
    except Exception as e:  # offline, gated, missing: all end the same way for a user
        first = str(e).splitlines()[0] if str(e) else ""
        raise QloraError(f"{repo_id}: not a local folder or a model qlora knows, and its "
                         f"config.json cannot be downloaded ({e.__class__.__name__}: {first})") from None
