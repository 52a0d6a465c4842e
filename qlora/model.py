"""Load a Hugging Face causal LM with a 4-bit (or 16-bit) frozen base, streaming.

The full 16-bit model never exists in memory: the skeleton is built on the meta device,
then checkpoint tensors arrive one at a time; each decoder linear is quantized to NF4 as it
arrives and every other tensor (embeddings, norms, output head) is cast to the compute dtype.
Peak memory is the 4-bit model plus one full-precision tensor.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from . import quant
from .errors import QloraError
from .memory import release_freed_memory
from .safetensors_io import checkpoint_files, iter_tensors

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local checkpoint folder; hub names (`owner/name`) are downloaded when online."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise QloraError(f"{path}: not a model folder (no config.json)")
        return path
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/", "~")):
        raise QloraError(f"{name_or_path}: model path not found")
    from huggingface_hub import snapshot_download  # only users online get here
    try:
        local = snapshot_download(str(name_or_path), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except Exception as e:  # network, auth and "no such repo" all end the same way for a user
        raise QloraError(f"{name_or_path}: cannot download model ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return Path(local)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks: the longest ModuleList of same-class blocks holding linears.

    Found by structure, not by architecture name, so any Llama-like family works.
    """
    best = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise QloraError(f"{type(model).__name__}: no decoder blocks with linear layers found")
    return best


def target_linears(model: nn.Module, targets: str | list[str] = "all-linear") -> dict[str, nn.Linear]:
    """`{qualified name: linear}` for the decoder linears to adapt/quantize.

    `targets` is "all-linear" or a list of leaf names (`q_proj`, `down_proj`, ...). A name that
    matches nothing is an error: silently training fewer layers than asked is worse.
    """
    layers = decoder_layers(model)
    layer_ids = {id(layer) for layer in layers}
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _inside(model, name, layer_ids):
            found[name] = module
    if not found:
        raise QloraError(f"{type(model).__name__}: no linear layers inside the decoder blocks")
    if targets == "all-linear":
        return found
    leaf_names = {n.rsplit(".", 1)[-1] for n in found}
    for t in targets:
        if t not in leaf_names:
            raise QloraError(f"lora target '{t}' matches no linear layer "
                             f"(available: {', '.join(sorted(leaf_names))})")
    return {n: m for n, m in found.items() if n.rsplit(".", 1)[-1] in targets}


def _inside(model: nn.Module, name: str, layer_ids: set[int]) -> bool:
    """Is module `name` nested inside one of the decoder blocks?"""
    parts = name.split(".")
    return any(id(model.get_submodule(".".join(parts[:i]))) in layer_ids for i in range(1, len(parts)))


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Place `value` as parameter or buffer `name`, frozen."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_model(name_or_path: str | Path, *, quantization: str = "nf4", double_quant: bool = True,
               compute_dtype: str | torch.dtype = "bfloat16",
               device: str | torch.device | None = None) -> PreTrainedModel:
    """Load a frozen causal LM: decoder linears as 4-bit `Linear4bit` (or 16-bit when
    `quantization="none"`), everything else in `compute_dtype`. Streams from safetensors."""
    if quantization not in (*quant.QUANT_TYPES, "none"):
        raise QloraError(f"model.quantization: expected nf4, fp4 or none, got {quantization!r}")
    dtype = DTYPES[compute_dtype] if isinstance(compute_dtype, str) else compute_dtype
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise QloraError(f"{path / 'config.json'}: cannot read model config ({str(e).splitlines()[0]})") from None

    # Parameters on meta (no memory); buffers such as rotary inv_freq are real and small.
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as e:
            raise QloraError(f"{path}: unsupported architecture ({str(e).splitlines()[0]})") from None

    quantized: set[str] = set()
    if quantization != "none":
        for name in target_linears(model):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, quant.empty_quant_linear(getattr(parent, leaf), quantization,
                                                           double_quant, dtype))
            quantized.add(name + ".weight")

    files = checkpoint_files(path)
    if files:
        _stream_safetensors(model, files, quantized, dtype, device)
    else:
        _load_torch_bin(model, path, quantized, dtype, device)

    if getattr(config, "tie_word_embeddings", False):
        # The checkpoint stores the shared matrix once; point the head at the embeddings.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise QloraError(f"{path}: checkpoint has no tensor for {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False  # the KV cache is useless (and costs memory) in training
    model.qlora_source = str(path)  # where export finds the original weights
    return model


def _stream_safetensors(model, files, quantized, dtype, device) -> None:
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    for i, (name, tensor) in enumerate(iter_tensors(files)):
        if name not in expected:
            continue  # e.g. rotary caches some old checkpoints carry; the model rebuilds them
        _place(model, name, tensor, quantized, dtype, device)
        del tensor
        if i % 16 == 15:
            release_freed_memory()
    release_freed_memory()


def _place(model, name, tensor, quantized, dtype, device) -> None:
    if name in quantized:
        quant.set_quantized_weight(model.get_submodule(name[: -len(".weight")]), tensor, device, dtype)
    elif tensor.is_floating_point():
        _set_tensor(model, name, tensor.to(device=device, dtype=dtype))
    else:
        _set_tensor(model, name, tensor.to(device))


def _load_torch_bin(model, path: Path, quantized, dtype, device) -> None:
    """Fallback for `.bin` checkpoints: torch.load holds each whole shard in memory."""
    shards = sorted(path.glob("pytorch_model*.bin"))
    if not shards:
        raise QloraError(f"{path}: no model weights (*.safetensors or pytorch_model*.bin)")
    warnings.warn(f"{path}: loading .bin weights shard by shard (slower, more memory than "
                  "safetensors); convert the checkpoint to safetensors to stream it", stacklevel=3)
    expected = {n for n, _ in model.named_parameters()}
    for shard in shards:
        state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        for name in list(state):
            if name in expected:
                _place(model, name, state.pop(name), quantized, dtype, device)
        del state


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer of a local folder, or of a hub model when online."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and (str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/"))):
        raise QloraError(f"{name_or_path}: tokenizer path not found")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else str(name_or_path))
    except (OSError, ValueError) as e:
        raise QloraError(f"{name_or_path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


def enable_gradient_checkpointing(model: PreTrainedModel, keep_matmul_layers: int = 0) -> None:
    """Recompute each decoder layer in backward instead of storing its activations.

    Non-reentrant only: reentrant checkpointing drops gradients when no *input* of the
    checkpointed block requires grad (our embeddings are frozen), which is how LoRA B factors
    silently stay zero in other stacks.

    In the first `keep_matmul_layers` decoder layers the recompute is selective: the outputs
    of the 4-bit base matmuls are kept from the forward pass and handed back during the
    recompute (`quant.keeping_outputs`), so backward re-runs only the cheap ops (norms,
    rotary, attention, LoRA). Same gradients; costs `matmul_output_bytes` per kept layer.
    (torch's selective-checkpoint policies do the same through a Python dispatch mode on
    every op, whose overhead ate most of the gain on CPU: 1.41x vs 1.33x at 1.3B.)
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in decoder_layers(model)[:keep_matmul_layers]:
        if not isinstance(layer, GradientCheckpointingLayer):
            raise QloraError(f"{type(layer).__name__} does not checkpoint itself per layer, so "
                             "it cannot keep matmul outputs (set train.keep_matmuls_gb=0)")
        # transformers' GradientCheckpointingLayer calls this attribute to checkpoint itself
        layer._gradient_checkpointing_func = functools.partial(
            checkpoint, use_reentrant=False, context_fn=functools.partial(_keep_contexts, layer))


def _keep_contexts(layer):
    """(context of the original forward, context of the recompute) for torch's checkpoint."""
    return quant.keeping_outputs(layer, "forward"), quant.keeping_outputs(layer, "recompute")


def matmul_output_bytes(model: nn.Module, tokens: int) -> int:
    """Bytes that keeping one decoder layer's 4-bit matmul outputs costs for `tokens` tokens."""
    linears = [m for m in decoder_layers(model)[0].modules() if isinstance(m, quant.Linear4bit)]
    return sum(tokens * m.out_features * m.compute_dtype.itemsize for m in linears)


def matmul_layers_within(model: nn.Module, budget_gb: float, tokens: int) -> int:
    """How many decoder layers' matmul outputs fit in `budget_gb` (train.keep_matmuls_gb)."""
    return layers_within_budget(matmul_output_bytes(model, tokens), len(decoder_layers(model)), budget_gb)


def layers_within_budget(per_layer: int, layers: int, budget_gb: float) -> int:
    """How many of `layers` layers costing `per_layer` bytes each fit in `budget_gb` GB (1e9);
    the rule of train.keep_matmuls_gb, shared by the trainer and `qlora plan`."""
    if per_layer == 0:  # a 16-bit base has no 4-bit matmuls to keep
        return 0
    return min(layers, int(budget_gb * 1e9 // per_layer))
