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
* everything else (embeddings, norms, the output head, biases): the original tensor cast to
  the output dtype (floating point) or copied (integer buffers).

The 4-bit round trip runs on the CPU; it is bitwise what `load_model` builds on the CPU.

With `merge_into="original"` every tensor starts from the original 16/32-bit checkpoint
weight instead. Trade-off: the adapter was trained to correct the *quantized* base, so this
export differs from what training saw by the quantization error of every decoder linear
(on the order of a few percent of each weight), and its outputs drift from the adapter's
accordingly; in exchange it keeps the base model's full-precision weights, which is what
you want when the adapter is meant to be applied to the full-precision base (e.g. to match
`PeftModel` on an unquantized model). The verification is then reported, never enforced.

The output folder is published atomically (a temporary sibling renamed at the end): a crash
or a failed check leaves no half-written export and never touches an existing one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import quant
from .adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_adapter_config, scaling_of
from .atomic import write_atomically
from .errors import QloraError
from .lora import merged_weight
from .model import DTYPES as COMPUTE_DTYPES
from .model import resolve_model_path, target_linears
from .safetensors_io import DTYPES as ST_DTYPES
from .safetensors_io import INDEX_NAME, SINGLE_NAME, checkpoint_files, read_header, read_tensor

log = logging.getLogger(__name__)

OUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16,
              "float16": torch.float16, "bfloat16": torch.bfloat16}
MERGE_INTO = ("dequantized", "original")
FP16_MAX = 65504.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
# Verification tolerance, relative to the largest |logit| (see verify_export for why 2%).
VERIFY_RTOL = 0.02
VERIFY_PROMPTS = 3
VERIFY_TOKENS = 32
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
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


@dataclass
class Source:
    """Everything `export` needs to know about where the weights come from."""
    adapter_dir: Path
    base: Path
    tokenizer: str
    quantization: str
    double_quant: bool
    compute_dtype: torch.dtype
    settings_from: str  # "recipe", "default", "arguments", "recipe+arguments"... (for the report)


def resolve_source(source: str | Path, *, base=None, quantization=None, double_quant=None,
                   compute_dtype=None) -> Source:
    """Find the adapter, the base model and the quantization settings training used."""
    path = Path(source).expanduser()
    recipe = None
    if (path / "recipe.yaml").is_file() and not (path / CONFIG_NAME).is_file():  # a run dir
        adapter_dir = path / "adapter"
        if not (adapter_dir / CONFIG_NAME).is_file():
            ckpts = sorted(p.name for p in path.glob("checkpoint-*") if (p / CONFIG_NAME).is_file())
            hint = f"; export a checkpoint instead, e.g. {path / ckpts[-1]}" if ckpts else ""
            raise QloraError(f"{path}: run has no final adapter ({adapter_dir.name}/{CONFIG_NAME} "
                             f"missing){hint}")
        recipe = path / "recipe.yaml"
    elif (path / CONFIG_NAME).is_file():  # an adapter or checkpoint-N folder
        adapter_dir = path
        if (path.parent / "recipe.yaml").is_file():  # RUN/adapter or RUN/checkpoint-N
            recipe = path.parent / "recipe.yaml"
    elif (path / "adapter" / CONFIG_NAME).is_file():
        adapter_dir = path / "adapter"
    else:
        raise QloraError(f"{source}: not a run, checkpoint or adapter directory "
                         f"(no recipe.yaml or {CONFIG_NAME})")

    _, cfg = read_adapter_config(adapter_dir)
    model_cfg = None
    if recipe is not None:
        from .config import load_recipe
        model_cfg = load_recipe(recipe).model
    base_name = base or (model_cfg.name_or_path if model_cfg else None) \
        or cfg.get("base_model_name_or_path")
    if not base_name:
        raise QloraError(f"{adapter_dir / CONFIG_NAME}: base_model_name_or_path is empty; "
                         "pass the base model (--base)")
    base_path = resolve_model_path(base_name)
    # The recipe's tokenizer when it names one of its own (it defaults to the base model).
    own_tokenizer = model_cfg and model_cfg.tokenizer != model_cfg.name_or_path
    tokenizer = model_cfg.tokenizer if own_tokenizer else str(base_path)

    q = quantization or (model_cfg.quantization if model_cfg else "nf4")
    if q not in (*quant.QUANT_TYPES, "none"):
        raise QloraError(f"quantization: expected nf4, fp4 or none, got {q!r}")
    dq = double_quant if double_quant is not None else (model_cfg.double_quant if model_cfg else True)
    cd = compute_dtype or (model_cfg.compute_dtype if model_cfg else "bfloat16")
    if isinstance(cd, str):
        if cd not in COMPUTE_DTYPES:
            raise QloraError(f"compute_dtype: expected one of {', '.join(COMPUTE_DTYPES)}, got {cd!r}")
        cd = COMPUTE_DTYPES[cd]
    given = (quantization, double_quant, compute_dtype)
    origin = "arguments" if all(v is not None for v in given) else (
        ("recipe" if model_cfg else "default") + ("+arguments" if any(v is not None for v in given) else ""))
    return Source(adapter_dir, base_path, tokenizer, q, bool(dq), cd, origin)


@dataclass
class Delta:
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)


def read_adapter_deltas(adapter_dir: Path) -> tuple[dict[str, Delta], float]:
    """{checkpoint tensor name (`X.weight`): LoRA factors}, and the scaling."""
    from safetensors.torch import load_file
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
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise QloraError(f"{adapter_dir}: missing {WEIGHTS_NAME}")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(weights)).items():
        k = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight", k)
        if not m:
            raise QloraError(f"{weights}: unexpected tensor {key}")
        factors.setdefault(m.group(1) + ".weight", {})[m.group(2)] = value
    deltas = {}
    for name, ab in factors.items():
        if set(ab) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise QloraError(f"{weights}: no {missing} tensor for {name[:-len('.weight')]}")
        deltas[name] = Delta(ab["lora_A"], ab["lora_B"])
    return deltas, scaling_of(settings)


def quantized_weight_names(base: Path, quantization: str) -> set[str]:
    """Checkpoint names of the weights training held in 4 bits: the decoder linears, found
    on a meta-device skeleton (no memory), exactly as `load_model` finds them."""
    if quantization == "none":
        return set()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(base)
        with init_empty_weights(include_buffers=True):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise QloraError(f"{base}: cannot build the model skeleton ({str(e).splitlines()[0]})") from None
    return {name + ".weight" for name in target_linears(skeleton)}


# --------------------------------------------------------------------------- the plan


@dataclass
class Item:
    name: str
    file: Path
    entry: dict  # the source safetensors header entry
    data_start: int
    dtype: torch.dtype  # output dtype
    shape: list[int]
    nbytes: int


@dataclass
class Shard:
    items: list[Item] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(files: list[Path], out_dtype: torch.dtype, max_bytes: int) -> list[Shard]:
    """Assign every checkpoint tensor, in on-disk order, to an output shard (from headers).

    Greedy like transformers: a shard closes when the next tensor would take it past
    `max_bytes`; a tensor larger than that gets a shard of its own.
    """
    shards = [Shard()]
    seen: dict[str, Path] = {}
    for path in files:
        header, data_start = read_header(path)
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if name in seen:
                raise QloraError(f"{path}: tensor {name} also appears in {seen[name].name}")
            seen[name] = path
            src = ST_DTYPES.get(entry["dtype"])
            if src is None:
                raise QloraError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
            dtype = out_dtype if src.is_floating_point else src
            nbytes = math.prod(entry["shape"]) * dtype.itemsize
            if shards[-1].items and shards[-1].nbytes + nbytes > max_bytes:
                shards.append(Shard())
            shards[-1].items.append(Item(name, path, entry, data_start, dtype, list(entry["shape"]), nbytes))
            shards[-1].nbytes += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _header_bytes(items: list[Item]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for it in items:
        header[it.name] = {"dtype": _ST_NAMES[it.dtype], "shape": it.shape,
                           "data_offsets": [offset, offset + it.nbytes]}
        offset += it.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


# --------------------------------------------------------------------------- the merge


@dataclass
class Merger:
    """Turns one checkpoint tensor into its exported value."""
    out_dtype: torch.dtype
    merge_into: str
    quantized: set[str]
    deltas: dict[str, Delta]
    scaling: float
    quantization: str
    double_quant: bool
    compute_dtype: torch.dtype
    merged: int = 0
    dequantized: int = 0

    def __call__(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if not w.is_floating_point():
            return w
        delta = self.deltas.get(name)
        if self.merge_into == "dequantized":
            if name in self.quantized:
                w = quant.nf4_roundtrip(w, self.quantization, self.double_quant, self.compute_dtype)
                self.dequantized += 1
            elif delta is not None:  # an adapted 16-bit layer (quantization "none")
                w = w.to(self.compute_dtype)
        if delta is not None:
            self._check_shapes(name, w, delta)
            w = merged_weight(w, delta.A, delta.B, self.scaling, torch.float32)
            self.merged += 1
        if self.out_dtype == torch.float16:
            check_fp16_range(name, w)
        return w.to(self.out_dtype)

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


def write_shards(tmp: Path, shards: list[Shard], merger: Merger) -> list[str]:
    """Stream every tensor from the base checkpoint through `merger` into its shard file.

    Only the tensor being worked on is in memory: each shard's header is known from the
    plan, so tensors are appended to the open file as they are produced.
    """
    names = shard_names(len(shards))
    handles: dict[Path, object] = {}
    try:
        for shard, fname in zip(shards, names):
            with open(tmp / fname, "wb") as out:
                out.write(_header_bytes(shard.items))
                for it in shard.items:
                    f = handles.get(it.file)
                    if f is None:
                        for old in handles.values():
                            old.close()  # on-disk order: a finished source file is done with
                        handles = {it.file: (f := open(it.file, "rb"))}
                    value = merger(it.name, read_tensor(f, it.entry, it.data_start, it.file, it.name))
                    value = value.contiguous()
                    if value.dtype != it.dtype or list(value.shape) != it.shape:
                        raise AssertionError(f"{it.name}: produced {value.dtype} {tuple(value.shape)}")
                    if it.nbytes:
                        out.write(memoryview(value.view(-1).view(torch.uint8).numpy()))
                    del value
            log.info("wrote %s (%.1f MB)", fname, shard.nbytes / 1e6)
    finally:
        for f in handles.values():
            f.close()
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
    name = str(out_dtype).removeprefix("torch.")
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


# --------------------------------------------------------------------------- verification


def verify_export(folder: Path, src: Source, tolerance_rtol: float | None) -> dict:
    """Logits of the exported model (fp32) vs the adapter on its quantized base, on a few
    fixed token sequences. Raises QloraError when `tolerance_rtol` is set and exceeded.

    The reference is the model training optimized: the 4-bit base exactly as `load_model`
    builds it, plus the saved LoRA factors. It is run twice: as it runs for `qlora generate`
    (activations in the compute dtype, reported as `max_logit_diff_compute_dtype`) and with
    every value upcast exactly to fp32 (`max_logit_diff`, the one that is enforced). The fp32
    run removes bf16 activation rounding, which alone moves a small model's logits by ~1-2%
    of their scale (`compute_dtype_noise`), so what remains is the export's own error: one
    rounding of each weight to fp16/bf16 (< 1% of the logit scale in our tests), while a wrong
    merge (no delta, scaling off by 10%, an unrelated base) moves them by 5% to 40%.
    """
    from transformers import AutoModelForCausalLM
    from .adapter import load_adapter
    from .model import load_model
    ref = load_model(src.base, quantization=src.quantization, double_quant=src.double_quant,
                     compute_dtype=src.compute_dtype, device="cpu")
    load_adapter(ref, src.adapter_dir)
    ref.eval()  # dropout off; QuantLinear keeps bitsandbytes off its CPU eval repack
    vocab = ref.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (VERIFY_PROMPTS, VERIFY_TOKENS), generator=g)
    with torch.no_grad():
        as_run = ref(ids).logits.float()
        want = upcast_activations(ref)(ids).logits.float()
    del ref
    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        got = exported(ids).logits.float()
    del exported
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    result = {"max_logit_diff": diff, "max_abs_logit": scale,
              "logit_tolerance": None if tolerance_rtol is None else tolerance_rtol * scale,
              "max_logit_diff_compute_dtype": (got - as_run).abs().max().item(),
              "compute_dtype_noise": (as_run - want).abs().max().item(),
              "argmax_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
    if tolerance_rtol is not None and not diff <= tolerance_rtol * scale:
        raise QloraError(f"{src.adapter_dir}: verification failed: exported logits differ from "
                         f"the adapter on its {src.quantization} base by {diff:.4g} "
                         f"(> {tolerance_rtol:.0%} of max |logit| {scale:.4g}); nothing was written")
    return result


def upcast_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Run `model` in fp32 without changing a single weight value (in place): 4-bit layers
    dequantize as before but compute in fp32; every other parameter is upcast exactly."""
    for m in model.modules():
        if isinstance(m, quant.Linear4bit):
            m.compute_dtype = torch.float32
    for p in model.parameters():
        if not isinstance(p, quant.Params4bit) and p.is_floating_point():
            p.data = p.data.float()
    return model


# --------------------------------------------------------------------------- export


def export(source: str | Path, out: str | Path, *, dtype: str = "fp16",
           merge_into: str = "dequantized", max_shard_size: str | int = "5GB",
           force: bool = False, verify: bool = True, base: str | Path | None = None,
           quantization: str | None = None, double_quant: bool | None = None,
           compute_dtype: str | torch.dtype | None = None) -> dict:
    """Merge the adapter of `source` (run, checkpoint or adapter folder) into its base and
    write a standalone Hugging Face model to `out`. Returns a report dict.

    `dtype`: "fp16" or "bf16" for the floating-point weights. `merge_into`: "dequantized"
    (default; the model training saw, see the module docstring) or "original" (the
    full-precision base; differs from what training saw by the quantization error).
    `max_shard_size`: "5GB", "200MB", ... per safetensors shard. `force`: replace a non-empty
    `out` (only once the new export is complete). `verify`: compare logits against the
    adapter on its quantized base before publishing (needs both models in memory, ~4 bytes
    per parameter for the exported one; turn off for models that do not fit). `base`,
    `quantization`, `double_quant`, `compute_dtype` override the run's recipe (an adapter
    folder without a recipe defaults to nf4, double quant, bfloat16, as training does).
    """
    t0 = time.perf_counter()
    if dtype not in OUT_DTYPES:
        raise QloraError(f"dtype: expected fp16 or bf16, got {dtype!r}")
    if merge_into not in MERGE_INTO:
        raise QloraError(f"merge_into: expected dequantized or original, got {merge_into!r}")
    out_dtype = OUT_DTYPES[dtype]
    max_bytes = parse_size(max_shard_size)
    out = Path(out).expanduser()
    _check_out(out, force)
    src = resolve_source(source, base=base, quantization=quantization,
                         double_quant=double_quant, compute_dtype=compute_dtype)
    for p in (src.base, src.adapter_dir):
        r, o = p.resolve(), out.resolve()
        if o == r or o in r.parents:
            raise QloraError(f"{out}: output folder would replace its own input {p}")

    files = checkpoint_files(src.base)
    if not files:
        raise QloraError(f"{src.base}: export needs safetensors weights (found none); "
                         "convert the checkpoint to safetensors first")
    deltas, scaling = read_adapter_deltas(src.adapter_dir)
    shards = plan_shards(files, out_dtype, max_bytes)
    planned = {it.name for s in shards for it in s.items}
    missing = sorted(set(deltas) - planned)
    if missing:
        raise QloraError(f"{src.adapter_dir}: adapter module {missing[0][:-len('.weight')]} has no "
                         f"weight {missing[0]} in {src.base}" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    merger = Merger(out_dtype, merge_into, quantized_weight_names(src.base, src.quantization),
                    deltas, scaling, src.quantization, src.double_quant, src.compute_dtype)
    report: dict = {}

    def write(tmp: Path) -> None:
        side = copy_side_files(src.base, src.tokenizer, tmp)  # first: a bad tokenizer fails fast
        write_config(src.base, tmp, out_dtype)
        names = write_shards(tmp, shards, merger)
        report.update(files=names + ([INDEX_NAME] if len(names) > 1 else []) + ["config.json"] + side)
        if verify:
            report.update(verify_export(tmp, src, VERIFY_RTOL if merge_into == "dequantized" else None))

    write_atomically(out, write)
    return {
        "out": str(out), "dtype": dtype, "merge_into": merge_into,
        "base": str(src.base), "adapter": str(src.adapter_dir),
        "quantization": src.quantization, "double_quant": src.double_quant,
        "compute_dtype": str(src.compute_dtype).removeprefix("torch."),
        "quantization_settings_from": src.settings_from,
        "shards": len(shards), "largest_shard_bytes": max(s.nbytes for s in shards),
        "total_size": sum(s.nbytes for s in shards),
        "tensors": len(planned), "tensors_merged": merger.merged,
        "tensors_dequantized": merger.dequantized, "scaling": scaling,
        "max_logit_diff": report.pop("max_logit_diff", None), **report,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise QloraError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QloraError(f"{out}: output folder exists and is not empty (use --force to replace it)")
