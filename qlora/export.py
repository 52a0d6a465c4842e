"""Export a trained adapter as a plain 16-bit Hugging Face model: merge, stream, shard, verify.

    export("runs/demo", "exported/demo", dtype="bf16")

The merge never builds the model. The base checkpoint is read one tensor at a time (see
safetensors_io.py), each output tensor is computed and written straight into its shard file,
and only then is the next tensor read, so peak memory is a few copies of the largest single
tensor (the embedding matrix, typically), not the model and not even one shard.

What gets written for each checkpoint tensor, with `merge_into="dequantized"` (the default):

* a decoder linear that training quantized (NF4/FP4) and the adapter changed:
  `dequant(quant(W)) + scaling * B @ A`, in fp32, cast once to the output dtype. The base is
  re-quantized exactly as training quantized it (cast to the compute dtype, bitsandbytes,
  blocksize 64, double quant as configured: `quant.nf4_roundtrip`), so the merged model is
  the function training optimized, up to the one final rounding to fp16/bf16;
* a decoder linear that training quantized but the adapter did not touch: `dequant(quant(W))`,
  for the same reason (training only ever saw the 4-bit version of it);
* an adapted layer that training held in 16 bits (quantization "none", or a target outside
  the decoder blocks): its compute-dtype copy (what training saw) plus the delta, likewise;
* every other floating-point tensor (embeddings, norms, the output head, biases): its
  compute-dtype copy, what training saw (for the usual bf16 checkpoint and bf16 compute, the
  tensor itself), cast to the output dtype; integer buffers are copied.

The 4-bit round trip runs on `device` (default: CUDA when available); it is bitwise what
`load_model` builds on that device. Across devices it is not quite: on an H100, bitsandbytes'
CUDA quantizer gave the same NF4 codes as its CPU one but double-quantized scales that differ
in rounding (dequantized weights apart by up to 9.8e-4 at a weight std of 0.02, about two
bf16 steps), so an adapter trained on a GPU merges most exactly on a GPU, and vice versa.

A pre-quantized 4-bit base (prequantized.py) is read through base_checkpoint.py: its
linears arrive dequantized, exactly what training multiplied by, and are merged as they are
(no round trip: for a checkpoint `model.cache_dir` wrote, bitwise the export of its source).

With `merge_into="original"` every tensor starts from the original 16/32-bit checkpoint
weight instead (impossible on a pre-quantized base: there is none). Trade-off: the adapter was trained to correct the *quantized* base, so this
export differs from what training saw by the quantization error of every decoder linear
(on the order of a few percent of each weight), and its outputs drift from the adapter's
accordingly; in exchange it keeps the base model's full-precision weights, which is what
you want when the adapter is meant to be applied to the full-precision base (e.g. to match
`PeftModel` on an unquantized model). The verification is then reported, never enforced.

Before anything is published the written weights are verified against the adapter on its
4-bit base, one decoder layer at a time (verify.py), also running them in fp16 for an fp16
export to catch activations fp16 cannot hold. The output folder is published atomically (a
temporary sibling renamed at the end, atomic.py): a crash, a kill or a failed check leaves no
half-written export and never touches an existing one; the next export cleans up after a
killed one. Next to the weights, `qlora_export.json` records the source, the settings, the
verification and the training data format (so `qlora generate` prompts the model as trained).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import quant
from .adapter import CONFIG_NAME, AdapterFactors, Delta, read_adapter_config
from .atomic import write_atomically
from .base_checkpoint import BaseCheckpoint, BaseTensor
from .dtypes import SAFETENSORS_CODES, dtype_name, dtype_named
from .errors import QloraError
from .lora import merged_weight
from .memory import release_freed_memory
from .model import build_skeleton, resolve_device
from .resolve import EXPORT_INFO, ModelSource, checkpoints, resolve
from .safetensors_io import INDEX_NAME, SINGLE_NAME
from .verify import FP16_MAX, VERIFY_RTOL, verify_folder

log = logging.getLogger(__name__)

MERGE_INTO = ("dequantized", "original")
OUT_DTYPES = ("float16", "bfloat16")  # names in dtypes.DTYPES; fp16/bf16 on the command line
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes in "5GB" / "200MB" / "10KB" (decimal, as transformers reads them) or "1GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = _SIZE.match(str(size))
        if not m:
            raise QloraError(f"max_shard_size: expected a size such as 5GB, 200MB or 10KB, got {size!r}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if n <= 0:
        raise QloraError(f"max_shard_size: must be positive, got {size!r}")
    return n


# --------------------------------------------------------------------------- the source


def read_adapter_deltas(adapter_dir: Path) -> tuple[AdapterFactors, float]:
    """{checkpoint tensor name (`X.weight`): LoRA factors, read on demand}, and the scaling.
    Refuses adapter features a plain merge cannot express."""
    settings, cfg = read_adapter_config(adapter_dir)
    cfg_path = adapter_dir / CONFIG_NAME
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise QloraError(f"{cfg_path}: {key} (per-module rank/alpha) is not supported by export")
    if cfg.get("use_dora"):
        raise QloraError(f"{cfg_path}: DoRA adapters are not supported by export")
    if cfg.get("modules_to_save"):
        raise QloraError(f"{cfg_path}: modules_to_save is not supported by export")
    if cfg.get("bias", "none") != "none":
        raise QloraError(f"{cfg_path}: bias={cfg['bias']!r} is not supported by export (only 'none')")
    return AdapterFactors(adapter_dir), settings.scaling


def quantized_weight_names(base: Path, quantization: str) -> set[str]:
    """Checkpoint names of the weights training held in 4 bits: the decoder linears, found
    on a meta-device skeleton (no memory), exactly as `load_model` finds them."""
    if quantization == "none":
        return set()
    return build_skeleton(base, quantization)[1]


# --------------------------------------------------------------------------- the plan


@dataclass
class Item:
    name: str
    dtype: torch.dtype  # output dtype
    shape: list[int]
    nbytes: int


@dataclass
class Shard:
    items: list[Item] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(entries: list[BaseTensor], out_dtype: torch.dtype, max_bytes: int) -> list[Shard]:
    """Assign every base tensor, in on-disk order, to an output shard (from headers).

    Greedy like transformers: a shard closes when the next tensor would take it past
    `max_bytes`; a tensor larger than that gets a shard of its own.
    """
    shards = [Shard()]
    for t in entries:
        dtype = out_dtype if t.dtype.is_floating_point else t.dtype
        nbytes = math.prod(t.shape) * dtype.itemsize
        if shards[-1].items and shards[-1].nbytes + nbytes > max_bytes:
            shards.append(Shard())
        shards[-1].items.append(Item(t.name, dtype, list(t.shape), nbytes))
        shards[-1].nbytes += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _header_bytes(items: list[Item]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for it in items:
        header[it.name] = {"dtype": SAFETENSORS_CODES[it.dtype], "shape": it.shape,
                           "data_offsets": [offset, offset + it.nbytes]}
        offset += it.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


# --------------------------------------------------------------------------- the merge


@dataclass
class Merger:
    """Turns one checkpoint tensor into its exported value: `merger(name, tensor)`, on the
    CPU in and out; the work happens on `device`."""
    out_dtype: torch.dtype
    merge_into: str
    quantized: set[str]
    deltas: Mapping[str, Delta]
    scaling: float
    quantization: str
    double_quant: bool
    compute_dtype: torch.dtype
    device: torch.device = torch.device("cpu")
    prequantized: bool = False  # the base's 4-bit linears arrive dequantized (base_checkpoint.py)
    merged: int = 0
    dequantized: int = 0

    def __call__(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if not w.is_floating_point():
            return w
        delta = self.deltas.get(name)
        if self.merge_into == "dequantized":
            if name in self.quantized and self.prequantized:
                self.dequantized += 1  # already exactly what training multiplied by
            elif name in self.quantized:
                # the 4-bit round trip on the device training ran on is what training saw
                w = quant.nf4_roundtrip(w, self.quantization, self.double_quant, self.compute_dtype,
                                        device=self.device)
                self.dequantized += 1
            else:  # embeddings, norms, head, 16-bit layers: training saw their compute-dtype copy
                w = w.to(self.compute_dtype)
        if delta is not None:
            self._check_shapes(name, w, delta)
            w = merged_weight(w.to(self.device), delta.A.to(self.device), delta.B.to(self.device),
                              self.scaling, torch.float32)
            self.merged += 1
        if self.out_dtype == torch.float16:
            check_fp16_range(name, w)
        return w.to(self.out_dtype).cpu()

    @staticmethod
    def _check_shapes(name, w, d) -> None:
        if w.dim() != 2 or d.A.shape[1] != w.shape[1] or d.B.shape[0] != w.shape[0] \
                or d.A.shape[0] != d.B.shape[1]:
            raise QloraError(f"adapter factors for {name} have shapes A {tuple(d.A.shape)}, "
                             f"B {tuple(d.B.shape)}; the base weight is {tuple(w.shape)}")


def check_fp16_range(name: str, w: torch.Tensor) -> None:
    """Refuse values fp16 cannot hold (|x| > 65504 would become inf or saturate)."""
    if w.numel() == 0:
        return
    lo, hi = torch.aminmax(w)
    peak = max(-lo.item(), hi.item())
    if peak > FP16_MAX or math.isinf(peak):
        raise QloraError(f"{name}: value {peak:.6g} does not fit in float16 (max {FP16_MAX:g}); "
                         "export with --dtype bf16 instead")


def write_shards(tmp: Path, shards: list[Shard], base: BaseCheckpoint, merger: Merger) -> list[str]:
    """Stream every tensor from the base checkpoint through `merger` into its shard file.

    Only the tensor being worked on is in memory: each shard's header is known from the
    plan, so tensors are appended to the open file as they are produced.
    """
    names = shard_names(len(shards))
    for shard, fname in zip(shards, names):
        with open(tmp / fname, "wb") as out:
            out.write(_header_bytes(shard.items))
            for it in shard.items:
                value = merger(it.name, base(it.name, merger.device)).contiguous()
                if value.dtype != it.dtype or list(value.shape) != it.shape:
                    raise AssertionError(f"{it.name}: produced {value.dtype} {tuple(value.shape)}")
                if it.nbytes:
                    out.write(memoryview(value.view(-1).view(torch.uint8).numpy()))
                del value
                # The round trip's temporaries leave freed holes glibc keeps unless asked:
                # the heap grew with every tensor written (benchmarks/README.md, "Export at scale").
                release_freed_memory()
        log.info("wrote %s (%.1f MB)", fname, shard.nbytes / 1e6)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
                 "weight_map": {it.name: fname for s, fname in zip(shards, names) for it in s.items}}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


# --------------------------------------------------------------------------- side files


def write_config(base: Path, tmp: Path, out_dtype: torch.dtype) -> None:
    try:
        cfg = json.loads((base / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise QloraError(f"{base / 'config.json'}: invalid JSON ({e})") from None
    cfg.pop("quantization_config", None)
    name = dtype_name(out_dtype)
    cfg["dtype"] = name
    if "torch_dtype" in cfg:  # older configs: keep the field their readers look for in sync
        cfg["torch_dtype"] = name
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def copy_side_files(base: Path, tokenizer: str, tmp: Path) -> list[str]:
    """generation_config.json from the base; tokenizer files from the tokenizer source."""
    copied = []
    if (base / "generation_config.json").is_file():
        shutil.copyfile(base / "generation_config.json", tmp / "generation_config.json")
        copied.append("generation_config.json")
    tok = Path(tokenizer).expanduser()
    if tok.is_dir():
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copyfile(tok / name, tmp / name)
                copied.append(name)
    else:  # a hub id: let transformers fetch it and write its own files
        from .model import load_tokenizer
        before = {p.name for p in tmp.iterdir()}
        load_tokenizer(tokenizer).save_pretrained(str(tmp))
        copied += sorted({p.name for p in tmp.iterdir()} - before)
    return copied


# --------------------------------------------------------------------------- export


def export(source: str | Path, out: str | Path, *, dtype: str = "fp16",
           merge_into: str = "dequantized", max_shard_size: str | int = "5GB",
           force: bool = False, verify: bool = True, base: str | Path | None = None,
           quantization: str | None = None, double_quant: bool | None = None,
           compute_dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> dict:
    """Merge the adapter of `source` (run, checkpoint or adapter folder) into its base and
    write a standalone Hugging Face model to `out`. Returns a report dict.

    `dtype`: "fp16" or "bf16" for the floating-point weights. `merge_into`: "dequantized"
    (default; the model training saw, see the module docstring) or "original" (the
    full-precision base; differs from what training saw by the quantization error).
    `max_shard_size`: "5GB", "200MB", ... per safetensors shard. `force`: replace a non-empty
    `out` (only once the new export is complete). `verify`: compare the written weights with
    the adapter on its quantized base, one decoder layer at a time (verify.py), before
    publishing. `base`, `quantization`, `double_quant`, `compute_dtype` override the run's
    recipe (an adapter folder without a recipe defaults to nf4, double quant, bfloat16, as
    training does). `device`: where the 4-bit round trip, the merge and the verification run
    (default: CUDA when available).
    """
    t0 = time.perf_counter()
    out_dtype = dtype_named(dtype, "dtype", OUT_DTYPES)
    if merge_into not in MERGE_INTO:
        raise QloraError(f"merge_into: expected dequantized or original, got {merge_into!r}")
    max_bytes = parse_size(max_shard_size)
    device = resolve_device(device)
    out = Path(out).expanduser()
    _check_out(out, force)
    src = adapter_source(source, base=base, quantization=quantization, double_quant=double_quant,
                          compute_dtype=compute_dtype)
    for p in (src.model, src.adapter):
        r, o = p.resolve(), out.resolve()
        if o == r or o in r.parents:
            raise QloraError(f"{out}: output folder would replace its own input {p}")

    base_ckpt = open_base(src, merge_into)
    deltas, scaling = read_adapter_deltas(src.adapter)
    shards = plan_shards(base_ckpt.entries, out_dtype, max_bytes)
    planned = {it.name for s in shards for it in s.items}
    missing = sorted(set(deltas) - planned)
    if missing:
        raise QloraError(f"{src.adapter}: adapter module {missing[0][:-len('.weight')]} has no "
                         f"weight {missing[0]} in {src.model}" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    merger = make_merger(src, base_ckpt, out_dtype, merge_into, deltas, scaling, device)
    report: dict = {"max_logit_diff": None, "base_prequantized": base_ckpt.prequantized is not None}

    def write(tmp: Path) -> None:
        side = copy_side_files(src.model, src.tokenizer, tmp)  # first: a bad tokenizer fails fast
        write_config(src.model, tmp, out_dtype)
        names = write_shards(tmp, shards, base_ckpt, merger)
        report.update(files=names + ([INDEX_NAME] if len(names) > 1 else []) + ["config.json"] + side)
        if verify:
            report.update(verify_folder(src, tmp, out_dtype, device=device,
                                        rtol=VERIFY_RTOL if merge_into == "dequantized" else None))
        (tmp / EXPORT_INFO).write_text(json.dumps(_export_info(src, dtype, merge_into, report), indent=2) + "\n")

    write_atomically(out, write)
    q = src.quant
    return {
        "out": str(out), "dtype": dtype, "merge_into": merge_into, "device": str(device),
        "base": src.model_id, "adapter": str(src.adapter),
        "quantization": q.quantization, "double_quant": q.double_quant,
        "compute_dtype": dtype_name(q.compute_dtype),
        "quantization_settings_from": src.settings_from,
        "shards": len(shards), "largest_shard_bytes": max(s.nbytes for s in shards),
        "total_size": sum(s.nbytes for s in shards),
        "tensors": len(planned), "tensors_merged": merger.merged,
        "tensors_dequantized": merger.dequantized, "scaling": scaling, **report,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def adapter_source(source, **overrides) -> ModelSource:
    """`resolve(source)`, which must hold an adapter: a run's final one, or a checkpoint named
    explicitly (a model to ship from a run that did not finish is the user's call)."""
    src = resolve(source, **overrides)
    if src.adapter is None:
        raise QloraError(f"{source}: a full model, not a run, checkpoint or adapter directory: "
                         "nothing to merge")
    if not src.final:
        ckpts = checkpoints(src.path)
        raise QloraError(f"{src.path}: run has no final adapter (adapter/{CONFIG_NAME} missing); "
                         f"export a checkpoint instead, e.g. {ckpts[-1]}")
    return src


def open_base(src: ModelSource, merge_into: str) -> BaseCheckpoint:
    """The base checkpoint under `src`'s adapter, read as training saw it. A pre-quantized
    4-bit base has no original 16-bit weights (so no `merge_into="original"`), and its
    4-bit format must be the one the adapter was trained on."""
    base = BaseCheckpoint(src.model, src.quant.compute_dtype)
    pre = base.prequantized
    if pre is None:
        return base
    if merge_into == "original":
        raise QloraError(f"{src.model}: a pre-quantized {pre.quant_type} checkpoint holds no original "
                         "16-bit weights to merge into; merge into the dequantized ones (the default, "
                         "what training saw) or pass the 16-bit original with --base")
    from .model import check_matches
    check_matches(src.model, pre, src.quant.quantization, src.quant.double_quant)
    return base


def make_merger(src: ModelSource, base: BaseCheckpoint, out_dtype: torch.dtype, merge_into: str,
                deltas, scaling: float, device: torch.device) -> Merger:
    """The Merger for `src`'s adapter on `base` (export and GGUF export)."""
    q = src.quant
    quantized = set(base.packed) if base.prequantized else quantized_weight_names(src.model, q.quantization)
    return Merger(out_dtype, merge_into, quantized, deltas, scaling, q.quantization, q.double_quant,
                  q.compute_dtype, device, prequantized=base.prequantized is not None)


def _export_info(src: ModelSource, dtype: str, merge_into: str, report: dict) -> dict:
    """What `qlora_export.json` records: where the export came from, how it was made and
    checked, and the training data format (so `qlora generate` prompts it as trained)."""
    verification = {k: report[k] for k in ("relative_error", "tolerance", "worst_layer",
                                           "max_logit_diff", "fp16_max_activation") if k in report}
    return {"base": src.model_id, "adapter": str(src.adapter), "dtype": dtype, "merge_into": merge_into,
            "base_prequantized": report.get("base_prequantized", False),
            "quantization": src.quant.quantization, "double_quant": src.quant.double_quant,
            "compute_dtype": dtype_name(src.quant.compute_dtype), "data_format": src.data_format,
            "verification": verification or None}


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise QloraError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QloraError(f"{out}: output folder exists and is not empty (use --force to replace it)")
