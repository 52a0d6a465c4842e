"""Hugging Face decoder architectures as llama.cpp expects them in GGUF: tensor names, the
q/k row layout, hyperparameter keys, rope scaling.

Facts from llama.cpp (convert_hf_to_gguf's llama/qwen converters, src/llama-arch.cpp):

* `MistralForCausalLM` has no GGUF architecture of its own: it is written as `llama`.
* `llama` applies rotary embeddings to adjacent pairs (x0, x1), (x2, x3), ... of each head,
  while Hugging Face's Llama rotates the two halves (x_i, x_{i+d/2}). The converter therefore
  reorders the rows of q_proj and k_proj (weights and biases) head by head: within a head,
  row 2j+e of the GGUF tensor is row e*(d/2)+j of the Hugging Face one (e in {0, 1}).
  `qwen2` and `qwen3` use the half-rotation ("neox") and keep the Hugging Face row order.
* One-dimensional tensors (norms, biases) are stored as F32 whatever the file type.
* Llama 3.1's "llama3" rope scaling is not a key: it is a `rope_freqs.weight` tensor of
  per-frequency divisors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from .errors import QloraError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp rotates adjacent pairs: q/k rows reordered (see module docstring)


ARCHS = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "mistral": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": ArchSpec(gguf.MODEL_ARCH.QWEN3, False),
}
# Buffers some older checkpoints carry; llama.cpp recomputes them.
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class Layout:
    """How one Hugging Face checkpoint maps onto a llama.cpp GGUF."""
    model_type: str
    spec: ArchSpec
    config: object  # the transformers PretrainedConfig of the base model
    names: gguf.TensorNameMap
    n_head: int
    n_head_kv: int
    head_dim: int

    @property
    def arch_name(self) -> str:
        """`general.architecture`, e.g. "llama"."""
        return gguf.MODEL_ARCH_NAMES[self.spec.arch]

    def gguf_name(self, hf_name: str) -> str | None:
        """GGUF name of a checkpoint tensor; None for buffers llama.cpp does not want."""
        if hf_name.endswith(SKIPPED_SUFFIXES):
            return None
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise QloraError(f"{hf_name}: no {self.arch_name} GGUF tensor corresponds to this "
                             f"checkpoint tensor ({self.model_type} checkpoints are expected to hold "
                             "only embeddings, decoder blocks, the final norm and the output head)")
        return name

    def _heads(self, hf_name: str) -> int | None:
        """Heads whose rows llama.cpp reorders in this tensor, or None to keep the order."""
        if not self.spec.permute_qk or hf_name.endswith(".lora_a"):  # A's rows are rank rows
            return None
        hf_name = hf_name.removesuffix(".lora_b")  # B's rows are the weight's rows
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return self.n_head
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return self.n_head_kv
        return None

    def to_gguf(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        """Rows in llama.cpp's order: per head, the halves interleaved. (out, ...) -> (out, ...).
        Also applies to a LoRA B factor (out, r), whose rows are the weight's rows."""
        n = self._heads(hf_name)
        if n is None:
            return t
        d = t.shape[0] // n
        return t.reshape(n, 2, d // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()

    def from_gguf(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_gguf`: back to Hugging Face's row order."""
        n = self._heads(hf_name)
        if n is None:
            return t
        d = t.shape[0] // n
        return t.reshape(n, d // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()

    def add_hparams(self, w: gguf.GGUFWriter) -> None:
        """Model hyperparameters under `<arch>.*` (those llama.cpp reads for these archs)."""
        c = self.config
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(self.head_dim)
        if getattr(c, "head_dim", None) is not None:  # may differ from hidden/heads (Qwen3)
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        rope = rope_parameters(c)
        w.add_rope_freq_base(rope["rope_theta"])
        kind = rope.get("rope_type", "default")
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
                             ("attention_factor", w.add_rope_scaling_yarn_attn_factor)):
                if rope.get(key) is not None:
                    add(rope[key])

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors llama.cpp needs that the checkpoint does not hold (fp32)."""
        rope = rope_parameters(self.config)
        if rope.get("rope_type") != "llama3":
            return {}
        # The divisor of each rotary frequency, from transformers' own llama3 formula:
        # inv_freq_llama3 = inv_freq / factor, and llama.cpp computes theta / factor.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](self.config, "cpu")
        base = rope["rope_theta"]
        plain = 1.0 / (base ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": (plain / scaled).float()}


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters` (older configs: rope_theta and
    rope_scaling at the top level, which transformers converts when it loads them)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in rope:
        rope = {**(getattr(config, "rope_scaling", None) or {}),
                "rope_theta": getattr(config, "rope_theta", 10000.0)}
    return rope


def read_layout(base: Path) -> Layout:
    """The GGUF layout of the checkpoint in `base`, or a one-line error naming what is not
    supported (checked before anything is written)."""
    from transformers import AutoConfig
    cfg_path = base / "config.json"
    try:
        config = AutoConfig.from_pretrained(base)
    except (ValueError, KeyError, OSError) as e:
        raise QloraError(f"{cfg_path}: cannot read the model config ({str(e).splitlines()[0]})") from None
    model_type = config.model_type
    spec = ARCHS.get(model_type)
    if spec is None:
        raise QloraError(f"{cfg_path}: model_type {model_type!r} is not supported by GGUF export "
                         f"(supported: {', '.join(ARCHS)})")
    rope = rope_parameters(config)
    kind = rope.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise QloraError(f"{cfg_path}: rope_parameters.rope_type {kind!r} is not supported by GGUF "
                         f"export (supported: {', '.join(ROPE_TYPES)})")
    if getattr(config, "use_sliding_window", False):
        raise QloraError(f"{cfg_path}: use_sliding_window=true has no equivalent in llama.cpp's "
                         f"{gguf.MODEL_ARCH_NAMES[spec.arch]} architecture")
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" and window and window < config.max_position_embeddings:
        log.warning("%s: sliding_window %d is not applied by llama.cpp (llama architecture): "
                    "outputs match only for contexts up to %d tokens", cfg_path, window, window)
    n_head = config.num_attention_heads
    n_head_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    if spec.permute_qk and head_dim % 2:
        raise QloraError(f"{cfg_path}: head_dim {head_dim} is odd; rotary embeddings need it even")
    return Layout(model_type, spec, config, gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers),
                  n_head, n_head_kv, head_dim)


def lora_alpha_for(scaling: float, r: int) -> float:
    """`adapter.lora.alpha` such that llama.cpp's scale alpha / r (src/llama-adapter.h,
    r = lora_b's ne[0]) equals our scaling; also right for rsLoRA's alpha / sqrt(r)."""
    return scaling * r
