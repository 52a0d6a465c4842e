"""Checkpoints whose decoder linears are already 4-bit, in bitsandbytes' serialization.

That is what `save_pretrained` writes for a model loaded with
`BitsAndBytesConfig(load_in_4bit=True)` (the `*-bnb-4bit` repositories users download): a
`quantization_config` in config.json, and per linear `W.weight` (packed codes, uint8
(n*k/2, 1)), `W.weight.absmax`, `W.weight.quant_map`, with double quantization
`W.weight.nested_absmax` and `W.weight.nested_quant_map`, and `W.weight.quant_state.
bitsandbytes__nf4` (the rest of the state, as JSON bytes). A 65B run then starts from a 34 GB
download instead of 130 GB, and nothing is quantized at load time.

`save_cache` writes the same format from a loaded model (`model.cache_dir`), one shard per
decoder layer, so later runs of a 16-bit model skip quantization; transformers loads it too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import write_atomically
from .errors import QloraError
from .safetensors_io import INDEX_NAME, check_intact, checkpoint_files

CACHE_STAMP = "qlora_cache.json"
CACHE_FORMAT = 1
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@dataclass(frozen=True)
class Prequantized:
    """How a checkpoint's linears were quantized (from config.json's quantization_config)."""
    quant_type: str
    double_quant: bool

    def required(self) -> set[str]:
        """The tensors every quantized linear must have (names after `W.`)."""
        parts = {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{self.quant_type}"}
        if self.double_quant:
            parts |= {"weight.nested_absmax", "weight.nested_quant_map"}
        return parts


def prequantized_settings(config, path: Path) -> Prequantized | None:
    """The checkpoint's 4-bit settings, or None for an ordinary 16/32-bit checkpoint."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        raise QloraError(f"{path / 'config.json'}: quantization_config method "
                         f"{qc.get('quant_method')!r} is not supported (only bitsandbytes 4-bit)")
    if not qc.get("load_in_4bit", qc.get("_load_in_4bit")):
        raise QloraError(f"{path / 'config.json'}: an 8-bit bitsandbytes checkpoint; qlora needs "
                         "a 4-bit one or the 16-bit original")
    return Prequantized(qc.get("bnb_4bit_quant_type", "fp4"), bool(qc.get("bnb_4bit_use_double_quant", False)))


def split_name(name: str, modules: set[str]) -> tuple[str, str] | None:
    """`model.layers.0.mlp.up_proj.weight.absmax` -> (`model.layers.0.mlp.up_proj`, `weight.absmax`)
    when that module is one of the 4-bit `modules`; else None."""
    i = name.find(".weight")
    while i != -1:
        if name[:i] in modules:
            return name[:i], name[i + 1:]
        i = name.find(".weight", i + 1)
    return None


def quant_state(parts: dict[str, torch.Tensor], compute_dtype: torch.dtype, device, where: str):
    """bitsandbytes' QuantState from a linear's serialized parts (weight excluded).

    Its dtype is set to the compute dtype: bitsandbytes dequantizes in fp32 and rounds once
    to the state's dtype, so this gives the same values as dequantizing to the stored dtype
    and casting, without a full fp32 copy of the weight on the way (CUDA's matmul does that)."""
    from bitsandbytes.functional import QuantState
    try:
        qs = QuantState.from_dict({k.removeprefix("weight."): v for k, v in parts.items() if k != "weight"},
                                  device=device)
    except (ValueError, AssertionError, KeyError, json.JSONDecodeError) as e:
        raise QloraError(f"{where}: malformed 4-bit quantization state ({e})") from None
    qs.dtype = compute_dtype
    return qs


def check_parts(module: str, parts: dict[str, torch.Tensor], pre: Prequantized, shape, qs, where: str) -> None:
    """The packed codes and scales must have the sizes the module's shape implies."""
    n = shape[0] * shape[1]
    codes, absmax = parts["weight"], parts["weight.absmax"]
    if tuple(qs.shape) != tuple(shape):
        raise QloraError(f"{where}: {module} is {tuple(qs.shape)} in its quantization state, "
                         f"the model expects {tuple(shape)}")
    if codes.dtype != torch.uint8 or codes.numel() != (n + 1) // 2:
        raise QloraError(f"{where}: {module}.weight has {codes.numel()} {codes.dtype} codes, "
                         f"expected {(n + 1) // 2} uint8 for {tuple(shape)}")
    blocks = -(-n // qs.blocksize)
    if absmax.numel() != blocks:
        raise QloraError(f"{where}: {module}.weight.absmax has {absmax.numel()} scales, expected {blocks}")
    if qs.quant_type != pre.quant_type:
        raise QloraError(f"{where}: {module} is {qs.quant_type}, config.json says {pre.quant_type}")


def load_prequantized(model, files: list[Path], modules: dict, pre: Prequantized, dtype: torch.dtype,
                      device: torch.device, place, streamer=None, layer_of=None) -> None:
    """Stream a pre-quantized checkpoint into `model`'s empty 4-bit `modules` (name -> QuantLinear);
    other tensors go through `place(name, tensor)`.

    A linear's parts may come in any order: they are gathered until complete. The codes and
    scales of layers streamed from disk are not even read: the streamer reads them in place
    when the layer runs."""
    from .offload import DiskHome
    from .quant import set_packed_weight
    from .safetensors_io import iter_entries
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    required, names = pre.required(), set(modules)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    refs: dict[str, dict[str, object]] = {}
    for name, entry in iter_entries(files):
        hit = split_name(name, names)
        if hit is None:
            if name in expected:
                place(name, entry.read())
            continue
        module, part = hit
        if part not in required:
            raise QloraError(f"{entry.path}: unexpected tensor {name} for a {pre.quant_type} "
                             f"{'double-quantized ' if pre.double_quant else ''}checkpoint")
        layer = layer_of(module) if layer_of else None
        in_place = (streamer is not None and isinstance(streamer.home, DiskHome)
                    and layer in streamer.slots and part in ("weight", "weight.absmax"))
        if in_place:  # a stand-in with the right shape and dtype, no memory
            refs.setdefault(module, {})[part] = entry
            parts_value = torch.zeros((), dtype=entry.dtype, device=device).expand(entry.shape)
        else:
            parts_value = entry.read()
        parts = pending.setdefault(module, {})
        parts[part] = parts_value
        if set(parts) == required:
            where = str(entry.path)
            q = modules[module]
            qs = quant_state(parts, dtype, device, where)
            check_parts(module, parts, pre, (q.out_features, q.in_features), qs, where)
            set_packed_weight(q, parts["weight"].to(device), qs)
            del pending[module]
            if layer is not None and streamer is not None and layer in streamer.slots:
                if module in refs:
                    for part_name, what in (("weight", "codes"), ("weight.absmax", "absmax")):
                        e = refs[module][part_name]
                        streamer.reference(layer, q, what, e.path, e.offset, e.nbytes)
                else:
                    streamer.adopt(layer, q)
    if pending:
        module, parts = next(iter(pending.items()))
        missing = sorted(required - set(parts))[0]
        raise QloraError(f"{files[0].parent}: {module} has no {missing} tensor"
                         + (f" (and {len(pending) - 1} more linears incomplete)" if len(pending) > 1 else ""))


# ----------------------------------------------------------------------------- cache


def source_stamp(source: Path, pre: Prequantized, compute_dtype: str) -> dict:
    """What a cache was built from: the source files (size, mtime) and the settings."""
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in checkpoint_files(source)}
    return {"format": CACHE_FORMAT, "source": str(source.resolve()), "files": files,
            "quant_type": pre.quant_type, "double_quant": pre.double_quant,
            "compute_dtype": compute_dtype}


def cache_folder(cache_dir: Path, source: Path, pre: Prequantized, compute_dtype: str) -> Path:
    key = f"{source.resolve()}|{pre.quant_type}|{pre.double_quant}|{compute_dtype}"
    return Path(cache_dir).expanduser() / f"{source.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def cache_problem(folder: Path, stamp: dict) -> str | None:
    """Why the cache in `folder` cannot be used (None if it can)."""
    if not folder.is_dir():
        return "absent"
    try:
        saved = json.loads((folder / CACHE_STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return "has no valid stamp"
    if saved != stamp:  # settings are part of the folder name, so the source files changed
        return "was built from other versions of the source files"
    try:
        for f in checkpoint_files(folder):
            check_intact(f)
    except QloraError as e:
        return f"is damaged ({e})"
    return None


def save_cache(model, folder: Path, source: Path, tokenizer_files: Path | None, stamp: dict,
               pre: Prequantized, compute_dtype: str) -> None:
    """Write `model`'s 4-bit base (as loaded: before LoRA) as a bitsandbytes 4-bit
    checkpoint, atomically.

    One shard per decoder layer plus one for the rest, so that only one layer's tensors are
    in memory at a time (streamed layers are attached one by one)."""
    from .model import decoder_layers
    from .quant import QuantLinear
    layers = decoder_layers(model)
    streamer = getattr(model, "qlora_streamer", None)
    prefix = _layers_prefix(model, layers)

    def linear_tensors(name: str, q: QuantLinear) -> dict[str, torch.Tensor]:
        out = {f"{name}.weight": q.weight.data.detach().cpu().contiguous()}
        for k, v in q.weight.quant_state.as_dict(packed=True).items():
            out[f"{name}.weight.{k}"] = v.detach().cpu().clone()  # quant maps are shared
        return out

    def write(tmp: Path) -> None:
        weight_map = {}
        n = len(layers) + 1
        names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        rest = {}
        for name, p in model.named_parameters(remove_duplicate=True):
            if not name.startswith(prefix + "."):
                rest[name] = p.detach().cpu().contiguous()
        save_file(rest, str(tmp / names[0]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(rest, names[0]))
        for i, layer in enumerate(layers):
            if streamer is not None:
                streamer.use(i, +1)
            tensors = {}
            for sub, m in layer.named_modules():
                full = f"{prefix}.{i}.{sub}" if sub else f"{prefix}.{i}"
                if isinstance(m, QuantLinear):
                    tensors.update(linear_tensors(full, m))
                else:
                    for pn, p in m.named_parameters(recurse=False):
                        tensors[f"{full}.{pn}"] = p.detach().cpu().contiguous()
            save_file(tensors, str(tmp / names[i + 1]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, names[i + 1]))
        if streamer is not None:
            streamer.release()
        total = sum((tmp / f).stat().st_size for f in names)
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=2))
        cfg = json.loads((source / "config.json").read_text())
        cfg["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": pre.quant_type, "bnb_4bit_use_double_quant": pre.double_quant,
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8"}
        cfg["dtype"] = compute_dtype
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        for f in ("generation_config.json",):
            if (source / f).is_file():
                shutil.copyfile(source / f, tmp / f)
        if tokenizer_files is not None and tokenizer_files.is_dir():
            for f in tokenizer_files.iterdir():
                if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "chat_template"))
                                    or f.name in ("vocab.json", "merges.txt", "added_tokens.json")):
                    shutil.copyfile(f, tmp / f.name)
        (tmp / CACHE_STAMP).write_text(json.dumps(stamp, indent=2))

    write_atomically(folder, write)


def _layers_prefix(model, layers) -> str:
    for name, m in model.named_modules():
        if m is layers:
            return name
    raise QloraError(f"{type(model).__name__}: decoder layers not found")
