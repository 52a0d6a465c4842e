"""Load a Hugging Face causal LM with a 4-bit (or 16-bit) frozen base, streaming.

The full 16-bit model never exists in memory: the skeleton is built on the meta device,
then checkpoint tensors arrive one at a time; each decoder linear is quantized to NF4 as it
arrives and every other tensor (embeddings, norms, output head) is cast to the compute dtype.
Peak memory is the 4-bit model plus one full-precision tensor.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import quant
from .attention import use_qlora_attention
from .dtypes import dtype_name, dtype_named
from .errors import QloraError
from .hub import local_model_dir, looks_like_hub_id, model_id
from .memory import release_freed_memory
from .offload import (attach_hooks, layer_slots, make_streamer, payload_bytes, resident_count)
from .prequantized import (Prequantized, cache_folder, cache_problem, load_prequantized,
                           prequantized_settings, save_cache, source_stamp)
from .safetensors_io import checkpoint_files, iter_tensors


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


def build_skeleton(path: Path, quantization: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16, config=None) -> tuple[PreTrainedModel, set[str]]:
    """The model of local folder `path` with no weights yet (parameters on the meta device,
    small buffers such as rotary frequencies real), its decoder linears already 4-bit
    placeholders unless `quantization` is "none"; and the checkpoint names of those
    quantized weights. `compute_dtype` is the dtype of everything else; `config`, when the
    caller has read it already, is `path`'s config."""
    if quantization not in (*quant.QUANT_TYPES, "none"):
        raise QloraError(f"model.quantization: expected nf4, fp4 or none, got {quantization!r}")
    config = config if config is not None else _read_config(path)
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
        except ValueError as e:
            raise QloraError(f"{path}: unsupported architecture ({str(e).splitlines()[0]})") from None
    quantized: set[str] = set()
    if quantization != "none":
        for name in target_linears(model):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, quant.empty_quant_linear(getattr(parent, leaf), quantization,
                                                           double_quant, compute_dtype))
            quantized.add(name + ".weight")
    return model, quantized


def load_model(name_or_path: str | Path, *, quantization: str = "nf4", double_quant: bool = True,
               compute_dtype: str | torch.dtype = "bfloat16",
               device: str | torch.device | None = None, offload: str = "none",
               offload_dir: str | Path | None = None, resident_layers: int | str = "auto",
               cache_dir: str | Path | None = None) -> PreTrainedModel:
    """Load a frozen causal LM: decoder linears as 4-bit `Linear4bit` (or 16-bit when
    `quantization="none"`), everything else in `compute_dtype`. Streams from safetensors.

    A checkpoint that is already 4-bit (bitsandbytes' serialization, `prequantized.py`) loads
    without quantizing; `quantization`/`double_quant` must match it. `cache_dir`: keep such a
    copy of a 16-bit checkpoint there after the first load and load it from there later.
    `offload` ("none", "cpu", "disk"): the 4-bit codes of all decoder layers but the first
    `resident_layers` ("auto": what fits) live in pinned host memory or a file in
    `offload_dir` and are streamed in per layer (`offload.py`).
    """
    dtype = dtype_named(compute_dtype, "model.compute_dtype")
    device = resolve_device(device)
    path = local_model_dir(name_or_path)
    config = _read_config(path)
    if offload != "none" and quantization == "none":
        raise QloraError("model.offload streams 4-bit weights; it needs model.quantization nf4 or fp4")

    source, pre, cache = path, prequantized_settings(config, path), None
    if pre is not None:
        check_matches(path, pre, quantization, double_quant)
    elif cache_dir and quantization != "none":
        wanted = Prequantized(quantization, double_quant)
        stamp = source_stamp(path, wanted, dtype_name(dtype))
        folder = cache_folder(Path(cache_dir), path, wanted, dtype_name(dtype))
        problem = cache_problem(folder, stamp)
        if problem is None:
            source, pre = folder, wanted
        else:
            if problem != "absent":
                warnings.warn(f"model.cache_dir: {folder} {problem}; rebuilding it", stacklevel=2)
            cache = (folder, stamp, wanted)

    model, quantized = build_skeleton(path, quantization, double_quant, dtype, config=config)
    modules = {n[: -len(".weight")]: model.get_submodule(n[: -len(".weight")]) for n in quantized}
    streamer = _make_streamer(model, offload, offload_dir, resident_layers, double_quant, dtype, device)
    layer_of = _layer_index(model)

    files = checkpoint_files(source)
    if pre is not None:
        load_prequantized(model, files, modules, pre, dtype, device,
                          place=lambda n, t: place_tensor(model, n, t, set(), dtype, device),
                          streamer=streamer, layer_of=layer_of)
    elif files:
        _stream_safetensors(model, files, quantized, dtype, device, streamer, layer_of)
    else:
        _load_torch_bin(model, path, quantized, dtype, device)

    if getattr(model.config, "tie_word_embeddings", False):
        # The checkpoint stores the shared matrix once; point the head at the embeddings.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    # init_empty_weights left non-persistent buffers (rotary inv_freq) real, on the CPU.
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and not buf.is_meta and buf.device != device:
                module._buffers[key] = buf.to(device)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise QloraError(f"{source}: checkpoint has no tensor for {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False  # the KV cache is useless (and costs memory) in training
    use_qlora_attention(model)  # transformers' sdpa, faster on CPU (qlora/attention.py)
    model.qlora_source = model_id(name_or_path)  # the base adapters record: hub id or local path
    model.qlora_prequantized = pre is not None and source == path  # no 16-bit original exists
    if streamer is not None:
        model.qlora_streamer = streamer
        attach_hooks(streamer)
    if cache is not None:
        folder, stamp, wanted = cache
        save_cache(model, folder, path, path, stamp, wanted, dtype_name(dtype))
    return model


def model_config(name_or_path: str | Path):
    """The model's config.json as a transformers config, without reading any weight."""
    return _read_config(local_model_dir(name_or_path))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1", ...); None means CUDA when there is a GPU, else the
    CPU. A device this machine lacks is a QloraError, before anything is loaded."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise QloraError(f"device: expected cpu, cuda or cuda:N, got {str(device)!r}") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise QloraError(f"device: {device} is not available on this machine "
                         f"({torch.cuda.device_count()} CUDA device(s))")
    if device.type not in ("cpu", "cuda"):
        raise QloraError(f"device: expected cpu, cuda or cuda:N, got {str(device)!r}")
    return device


def _read_config(path: Path):
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise QloraError(f"{path / 'config.json'}: cannot read model config ({str(e).splitlines()[0]})") from None


def check_matches(path: Path, pre: Prequantized, quantization: str, double_quant: bool) -> None:
    """A pre-quantized checkpoint fixes the 4-bit format; asking for another is an error."""
    if quantization == "none":
        raise QloraError(f"{path}: the checkpoint is already {pre.quant_type} 4-bit; it cannot be "
                         "loaded as model.quantization none (use its 16-bit original)")
    if quantization != pre.quant_type:
        raise QloraError(f"model.quantization: {quantization}, but {path} is pre-quantized as "
                         f"{pre.quant_type} (set model.quantization: {pre.quant_type})")
    if double_quant != pre.double_quant:
        raise QloraError(f"model.double_quant: {str(double_quant).lower()}, but {path} was quantized "
                         f"with double_quant {str(pre.double_quant).lower()}")


def _make_streamer(model, offload, offload_dir, resident_layers, double_quant, dtype, device):
    if offload == "none":
        return None
    layers = decoder_layers(model)
    layer_bytes = payload_bytes(layer_slots(layers[0], double_quant, quant.BLOCKSIZE))
    in_layers = {id(p) for p in layers.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in in_layers) * dtype.itemsize
    resident = resident_count(resident_layers, len(layers), layer_bytes, device, other)
    return make_streamer(layers, home=offload, folder=None if offload_dir is None else Path(offload_dir),
                         resident=resident, double_quant=double_quant, blocksize=quant.BLOCKSIZE,
                         device=device)


def _layer_index(model):
    """`module name -> decoder layer index` (None outside the decoder layers)."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."

    def layer_of(name: str) -> int | None:
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix):].split(".", 1)[0])
    return layer_of


def _stream_safetensors(model, files, quantized, dtype, device, streamer=None, layer_of=None) -> None:
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    for i, (name, tensor) in enumerate(iter_tensors(files)):
        if name not in expected:
            continue  # e.g. rotary caches some old checkpoints carry; the model rebuilds them
        place_tensor(model, name, tensor, quantized, dtype, device)
        del tensor
        if streamer is not None and name in quantized:
            layer = layer_of(name)
            if layer in streamer.slots:  # to its home as soon as it is quantized
                streamer.adopt(layer, model.get_submodule(name[: -len(".weight")]))
        if i % 16 == 15:
            release_freed_memory()
    release_freed_memory()


def place_tensor(model, name, tensor, quantized, dtype, device) -> None:
    """Put checkpoint tensor `name` into `model` on `device`: quantized if it is one of the
    `quantized` weights, else cast to `dtype` (floating point) or moved as is."""
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
                place_tensor(model, name, state.pop(name), quantized, dtype, device)
        del state


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer of a local folder, or of a hub model when online."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and not looks_like_hub_id(str(name_or_path)):
        raise QloraError(f"{name_or_path}: tokenizer path not found")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else str(name_or_path))
    except (OSError, ValueError) as e:
        raise QloraError(f"{name_or_path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
