"""Export for llama.cpp and Ollama: the merged model, or the adapter alone, as GGUF.

    export_gguf("runs/demo", "demo.gguf", dtype="f16")          # + demo.Modelfile
    export_gguf_lora("runs/demo", "demo-lora.gguf")             # llama.cpp --lora

The merged model is the safetensors export's model (export.py): the same source resolution,
the same per-tensor merge (`Merger`: dequantized NF4 base + (alpha/r)·B·A by default), the
same streaming (one checkpoint tensor in memory at a time). GGUF's header lists every
tensor's name, type, shape and offset before the data, and all of that is known from the
checkpoint headers, so the header is written first and each merged tensor is appended as it
is produced. Layout (names, q/k row order, F32 one-dimensional tensors) and hyperparameters
are gguf_arch.py's; the tokenizer is gguf_vocab.py's; the Modelfile is ollama.py's.

Types: `f16` and `bf16` hold the safetensors export's values bit for bit; `q8_0` quantizes
each run of 32 values of a row to int8 with one fp16 scale (llama.cpp's Q8_0, via gguf's
reference quantizer) straight from the fp32 merge, so rows must be multiples of 32 wide.
Norms and biases are F32 in every case (llama.cpp expects them so).

Verified before it is published: the written file is parsed again with gguf.GGUFReader, and
every tensor, brought back to Hugging Face layout, is compared with a fresh merge of the same
checkpoint tensor (bitwise for f16/bf16/F32, within one Q8_0 step for q8_0). Only then are the
.gguf and its Modelfile renamed into place together (atomic.write_files_atomically).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .atomic import write_files_atomically
from .errors import QloraError
from .base_checkpoint import BaseCheckpoint, BaseTensor
from .export import MERGE_INTO, Merger, adapter_source, check_fp16_range, make_merger, open_base, \
    read_adapter_deltas
from .gguf_arch import Layout, lora_alpha_for, read_layout
from .gguf_vocab import read_vocab
from .ollama import match_chat_template, modelfile_text
from .model import resolve_device

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
GGUF_DTYPES = {"f16": Q.F16, "fp16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {Q.F16: gguf.LlamaFileType.MOSTLY_F16, Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
              Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
TORCH_OF = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
Q8_BLOCK = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]  # 32 values per scale
QUANT_CHUNK_BYTES = 64 << 20  # fp32 rows quantized at a time (gguf's numpy quantizer copies)


@dataclass
class Planned:
    """One tensor of the GGUF, planned from the checkpoint headers before anything is read."""
    hf_name: str  # checkpoint name, e.g. model.layers.0.self_attn.q_proj.weight
    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]  # Hugging Face (PyTorch) shape
    qtype: gguf.GGMLQuantizationType
    file: Path | None = None  # source safetensors file (None: generated, e.g. rope_freqs)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def plan_model(entries: list[BaseTensor], layout: Layout, qtype) -> list[Planned]:
    """Every base tensor, in on-disk order, with its GGUF name and type. Fails before
    anything is written on a tensor GGUF cannot take (unknown name, q8_0 width)."""
    plan: list[Planned] = []
    for t in entries:
        target = layout.gguf_name(t.name)
        if target is None:
            continue
        if not t.dtype.is_floating_point:
            raise QloraError(f"{t.file}: tensor {t.name} has dtype {t.dtype}; GGUF export "
                             "expects floating-point weights")
        qt = Q.F32 if len(t.shape) == 1 else qtype
        if qt == Q.Q8_0 and t.shape[-1] % Q8_BLOCK:
            raise QloraError(f"{t.file}: tensor {t.name} has rows of {t.shape[-1]} values, not a multiple "
                             f"of {Q8_BLOCK} (a q8_0 block); export with --dtype f16 or bf16")
        plan.append(Planned(t.name, target, t.shape, qt, t.file))
    plan += [Planned(name, name, tuple(t.shape), Q.F32) for name, t in layout.extra_tensors().items()]
    return plan


def encode(t: torch.Tensor, qtype) -> np.ndarray:
    """The tensor's bytes as GGUF stores them (a flat uint8 array)."""
    if qtype != Q.Q8_0:
        return t.to(TORCH_OF[qtype]).contiguous().view(-1).view(torch.uint8).numpy()
    rows = t.reshape(-1, t.shape[-1]).float().numpy()  # (rows, cols)
    out = np.empty((rows.shape[0], rows.shape[1] // Q8_BLOCK * gguf.GGML_QUANT_SIZES[Q.Q8_0][1]), np.uint8)
    step = max(1, QUANT_CHUNK_BYTES // (rows.shape[1] * 4))
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = gguf.quants.quantize(np.ascontiguousarray(rows[i:i + step]), Q.Q8_0)
    return out.reshape(-1)


def decode(raw: np.ndarray, qtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `encode`: F16/BF16/F32 in their own dtype, Q8_0 dequantized to fp32."""
    if qtype != Q.Q8_0:
        return torch.from_numpy(raw).view(TORCH_OF[qtype]).reshape(shape)
    cols = shape[-1]
    rows = raw.reshape(-1, cols // Q8_BLOCK * gguf.GGML_QUANT_SIZES[Q.Q8_0][1])
    return torch.from_numpy(gguf.quants.dequantize(rows, Q.Q8_0)).reshape(shape)


class GGUFTensors:
    """Read a GGUF's tensors back by their Hugging Face names, in Hugging Face layout.

    GGUFReader parses the header (names, types, shapes, offsets) and memory-maps the file;
    tensor bytes are read with `readinto` instead of through the map, so pages of tensors
    already checked do not stay in the process's resident memory (see safetensors_io.py).
    Usable on its own as the exported-weights source of a model-level check.
    """

    def __init__(self, path: Path, layout: Layout, names: dict[str, str]):
        self.path, self.layout = Path(path), layout
        self.reader = gguf.GGUFReader(self.path)
        self.info = {t.name: t for t in self.reader.tensors}
        self.gguf_name = names  # {hf name: gguf name}

    def get(self, hf_name: str) -> torch.Tensor:
        t = self.info[self.gguf_name[hf_name]]
        raw = np.empty(int(t.n_bytes), np.uint8)
        with open(self.path, "rb") as f:
            f.seek(int(t.data_offset))
            if f.readinto(memoryview(raw)) != raw.size:
                raise QloraError(f"{self.path}: truncated at tensor {t.name}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return self.layout.from_gguf(hf_name, decode(raw, t.tensor_type, shape))

    def field(self, key: str):
        f = self.reader.get_field(key)
        return None if f is None else f.contents()


def compare(name: str, got: torch.Tensor, want: torch.Tensor, qtype) -> float:
    """Largest |got - want|; raises unless bitwise equal (F16/BF16/F32) or within one Q8_0
    step of each 32-value block (step = block max|want| / 127)."""
    if got.shape != want.shape:
        raise QloraError(f"verification failed: {name} reads back as {tuple(got.shape)}, "
                         f"expected {tuple(want.shape)}; nothing was written")
    if qtype != Q.Q8_0:
        if not torch.equal(got, want.to(got.dtype)) or not torch.equal(got.to(want.dtype), want):
            raise QloraError(f"verification failed: {name} differs from the merged weight "
                             "after reading the GGUF back; nothing was written")
        return 0.0
    diff = (got - want.float()).reshape(-1, Q8_BLOCK).abs()
    step = want.float().reshape(-1, Q8_BLOCK).abs().amax(-1, keepdim=True) / 127
    if not bool((diff <= step).all()):
        raise QloraError(f"verification failed: {name} differs from the merged weight by more "
                         "than one q8_0 step after reading the GGUF back; nothing was written")
    return diff.max().item()


# --------------------------------------------------------------------------- writing


def _start(tmp: Path, layout: Layout, name: str) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(tmp, layout.arch_name)
    w.add_name(name)
    return w


def _write(w: gguf.GGUFWriter, plan: list[Planned], produce) -> None:
    """Header, metadata and tensor table first (all known from `plan`), then each tensor's
    data as `produce(planned)` makes it: one tensor in memory at a time."""
    for p in plan:
        byte_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
        w.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for p in plan:
        data = encode(produce(p), p.qtype)
        if data.nbytes != p.nbytes:
            raise AssertionError(f"{p.hf_name}: {data.nbytes} bytes, planned {p.nbytes}")
        w.write_tensor_data(data)
    w.close()


def _read_source(p: Planned, layout: Layout, base: BaseCheckpoint, merger: Merger) -> torch.Tensor:
    """The exported value of one planned tensor in Hugging Face layout."""
    if p.file is None:
        return layout.extra_tensors()[p.hf_name]
    return merger(p.hf_name, base(p.hf_name, merger.device))


def _check_outputs(paths: list[Path], force: bool) -> None:
    for p in paths:
        if p.is_dir():
            raise QloraError(f"{p}: is a folder; --out names the .gguf file to write")
        if p.exists() and not force:
            raise QloraError(f"{p}: exists (use --force to replace it)")


def _gguf_type(dtype: str, allowed: tuple[str, ...]):
    if dtype not in allowed:
        raise QloraError(f"dtype: expected {', '.join(allowed)} for this GGUF export, got {dtype!r}")
    return GGUF_DTYPES[dtype]


def modelfile_path(out: Path) -> Path:
    return out.with_name(out.stem + ".Modelfile")


def export_gguf(source: str | Path, out: str | Path, *, dtype: str = "f16",
                merge_into: str = "dequantized", base_only: bool = False, force: bool = False,
                verify: bool = True, base: str | Path | None = None, quantization: str | None = None,
                double_quant: bool | None = None, compute_dtype=None, device=None) -> dict:
    """Write the merged model of `source` (run, checkpoint or adapter folder) as one GGUF file
    `out`, plus an Ollama Modelfile beside it (`out` with suffix .Modelfile). Returns a report.

    `dtype`: "f16" (or "fp16"), "bf16" or "q8_0". `merge_into`: as for the safetensors
    export. `base_only`: the base alone, as training saw it (dequantized; with
    merge_into="original" the original weights): the base GGUF for `export_gguf_lora`
    adapters. `verify`: re-read and compare every tensor before publishing (re-runs the
    merge: about twice the time). `force`: replace existing files (only once the new ones
    are complete). `device`: where the 4-bit round trip and the merge run (default: CUDA
    when available). The other arguments override the run's recipe, as for `export`.
    """
    t0 = time.perf_counter()
    qtype = _gguf_type(dtype, ("f16", "fp16", "bf16", "q8_0"))
    out = Path(out).expanduser()
    _check_outputs([out, modelfile_path(out)], force)
    if merge_into not in MERGE_INTO:
        raise QloraError(f"merge_into: expected dequantized or original, got {merge_into!r}")
    device = resolve_device(device)
    src = adapter_source(source, base=base, quantization=quantization,
                         double_quant=double_quant, compute_dtype=compute_dtype)
    layout = read_layout(src.model)
    base_ckpt = open_base(src, merge_into)
    plan = plan_model(base_ckpt.entries, layout, qtype)
    deltas, scaling = ({}, 0.0) if base_only else read_adapter_deltas(src.adapter)
    planned = {p.hf_name for p in plan}
    missing = sorted(set(deltas) - planned)
    if missing:
        raise QloraError(f"{src.adapter}: adapter module {missing[0][:-len('.weight')]} has no "
                         f"weight in {src.model}")
    vocab = read_vocab(src.tokenizer, layout.config.vocab_size)
    chat = match_chat_template(vocab.hf, vocab.add_bos)
    stops = [vocab.tokens[i].decode() for i in _eos_ids(src.model, vocab) if i < len(vocab.tokens)]
    what = f"{'base only' if base_only else 'merged'}, {dtype}"
    modelfile = modelfile_text(out, modelfile_path(out), chat, stops, what)

    out_dtype = TORCH_OF.get(qtype, torch.float32)  # q8_0 quantizes from the fp32 merge
    merger = make_merger(src, base_ckpt, out_dtype, merge_into, deltas, scaling, device)
    report: dict = {}

    def write(tmp: Path) -> None:
        w = _start(tmp, layout, out.stem)
        w.add_type(gguf.GGUFType.MODEL)
        layout.add_hparams(w)
        w.add_file_type(FILE_TYPES[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(w)
        _write(w, plan, lambda p: layout.to_gguf(p.hf_name, _read_source(p, layout, base_ckpt, merger)))
        log.info("wrote %d tensors (%.1f MB)%s", len(plan), tmp.stat().st_size / 1e6,
                 "; verifying" if verify else "")
        if verify:
            fresh = dataclasses.replace(merger, merged=0, dequantized=0)
            report.update(verify_model(tmp, plan, layout, base_ckpt, fresh))

    write_files_atomically({out: write, modelfile_path(out): lambda t: t.write_text(modelfile)})
    return {"out": str(out), "modelfile": str(modelfile_path(out)), "format": "gguf",
            "architecture": layout.arch_name, "dtype": dtype, "merge_into": merge_into,
            "base_only": base_only, "base": src.model_id, "adapter": str(src.adapter), "device": str(device),
            "tensors": len(plan), "tensors_merged": merger.merged,
            "tensors_dequantized": merger.dequantized, "bytes": out.stat().st_size,
            "tokenizer": f"{vocab.model}/{vocab.pre}", "chat_template": chat.reason,
            "verified": verify, **report, "seconds": round(time.perf_counter() - t0, 3)}


def verify_model(path: Path, plan: list[Planned], layout: Layout, base: BaseCheckpoint,
                 merger: Merger) -> dict:
    """Every tensor of the written GGUF, read back and returned to Hugging Face layout,
    against a fresh merge of its checkpoint tensor (see `compare`)."""
    back = GGUFTensors(path, layout, {p.hf_name: p.name for p in plan})
    if set(back.info) != {p.name for p in plan}:
        raise QloraError(f"verification failed: {path} holds other tensors than planned")
    worst = 0.0
    for p in plan:
        if back.info[p.name].tensor_type != p.qtype:
            raise QloraError(f"verification failed: {p.name} reads back as "
                             f"{back.info[p.name].tensor_type.name}, planned {p.qtype.name}")
        worst = max(worst, compare(p.hf_name, back.get(p.hf_name), _read_source(p, layout, base, merger), p.qtype))
    return {"verified_tensors": len(plan), "max_abs_diff": worst}


def _eos_ids(base: Path, vocab) -> list[int]:
    """End-of-sequence ids: the tokenizer's and generation_config.json's (may be a list)."""
    ids = [vocab.special.special_token_ids.get("eos")]
    gen = base / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    return [i for i in dict.fromkeys(ids) if isinstance(i, int)]


# --------------------------------------------------------------------------- the adapter alone


def export_gguf_lora(source: str | Path, out: str | Path, *, dtype: str = "f16", force: bool = False,
                     verify: bool = True, base: str | Path | None = None) -> dict:
    """Write the LoRA adapter of `source` alone as a llama.cpp GGUF adapter
    (`llama-cli -m BASE.gguf --lora out`). Returns a report.

    Per adapted weight `X` (GGUF name): `X.lora_a` = A (r, in) and `X.lora_b` = B (out, r),
    B's rows in llama.cpp's q/k order like the weight's; `adapter.lora.alpha` = scaling * r
    so that llama.cpp's alpha / r is our scaling. `dtype`: "f16" or "bf16". The base GGUF it
    is applied to should be `export_gguf(..., base_only=True)` of the same run (the weights
    the adapter was trained against) or any GGUF of the same base model.
    """
    t0 = time.perf_counter()
    qtype = _gguf_type(dtype, ("f16", "fp16", "bf16"))
    out = Path(out).expanduser()
    _check_outputs([out], force)
    src = adapter_source(source, base=base)
    layout = read_layout(src.model)
    deltas, scaling = read_adapter_deltas(src.adapter)
    if not deltas:
        raise QloraError(f"{src.adapter}: the adapter has no LoRA tensors")
    ranks = {d.A.shape[0] for d in deltas.values()}
    if len(ranks) != 1:  # one alpha for the file: llama.cpp scales each pair by alpha / its rank
        raise QloraError(f"{src.adapter}: LoRA ranks differ between modules ({sorted(ranks)})")
    r = ranks.pop()
    plan: list[Planned] = []
    factors: dict[str, torch.Tensor] = {}
    for hf_name in sorted(deltas, key=_layer_order):
        target = layout.gguf_name(hf_name)
        d = deltas[hf_name]
        for suffix, t in ((".lora_a", d.A), (".lora_b", layout.to_gguf(hf_name, d.B))):
            if qtype == Q.F16:
                check_fp16_range(hf_name + suffix, t.float())
            plan.append(Planned(hf_name + suffix, target + suffix, tuple(t.shape), qtype))
            factors[hf_name + suffix] = t

    def write(tmp: Path) -> None:
        w = _start(tmp, layout, out.stem)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_alpha_for(scaling, r))
        _write(w, plan, lambda p: factors[p.hf_name])
        if verify:
            back = GGUFTensors(tmp, layout, {p.hf_name: p.name for p in plan})
            for p in plan:
                got = back.get(p.hf_name)  # lora_b's rows come back in HF order too
                want = deltas[p.hf_name[:-len(".lora_a")]]
                want = want.A if p.hf_name.endswith(".lora_a") else want.B
                compare(p.hf_name, got, want.to(TORCH_OF[qtype]), qtype)

    write_files_atomically({out: write})
    return {"out": str(out), "format": "gguf-lora", "architecture": layout.arch_name, "dtype": dtype,
            "base": src.model_id, "adapter": str(src.adapter), "rank": r, "scaling": scaling,
            "lora_alpha": lora_alpha_for(scaling, r), "modules": len(deltas),
            "bytes": out.stat().st_size, "verified": verify,
            "seconds": round(time.perf_counter() - t0, 3)}


def _layer_order(name: str):
    """model.layers.10.x sorts after model.layers.9.x."""
    return [int(s) if s.isdigit() else s for s in name.split(".")]
