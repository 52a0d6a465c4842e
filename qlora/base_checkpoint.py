"""A base model's checkpoint read tensor by tensor, as the 16/32-bit checkpoint it stands for.

    base = BaseCheckpoint(Path("models/llama-65b-bnb-4bit"), torch.bfloat16)
    for t in base.entries:                 # on-disk order, headers only
        w = base(t.name)                   # one tensor; a 4-bit linear comes back dequantized

Export, GGUF export, verification and `qlora inspect --base` read the base through this, so
that a pre-quantized checkpoint (bitsandbytes' 4-bit serialization, prequantized.py) works
wherever a 16-bit one does. For such a checkpoint the original 16-bit weights do not exist:
a packed linear `X.weight` reads as its dequantized weight in the compute dtype, bitwise
what training multiplied by (the same QuantState and bitsandbytes call `load_model` uses),
and its quantization-state tensors (`X.weight.absmax`, ...) are not listed. An ordinary
checkpoint reads as it is stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .dtypes import SAFETENSORS
from .errors import QloraError
from .prequantized import Prequantized, check_parts, prequantized_settings, quant_state
from .safetensors_io import TensorReader, checkpoint_files, read_header


@dataclass(frozen=True)
class BaseTensor:
    """One tensor as a 16/32-bit checkpoint would hold it (headers only)."""
    name: str
    dtype: torch.dtype
    """Its stored dtype; for a packed 4-bit linear, the compute dtype it dequantizes to."""
    shape: tuple[int, ...]
    file: Path


class BaseCheckpoint:
    """`base(name)` -> tensor (CPU), one at a time; `base.entries` lists them in on-disk
    order. `compute_dtype`: what packed 4-bit weights dequantize to."""

    def __init__(self, folder: Path, compute_dtype: torch.dtype):
        self.folder, self.compute_dtype = Path(folder), compute_dtype
        self.files = checkpoint_files(self.folder)
        if not self.files:
            raise QloraError(f"{self.folder}: needs safetensors weights (found none); "
                             "convert the checkpoint to safetensors first")
        self.prequantized: Prequantized | None = prequantized_in(self.folder)
        self.read = TensorReader(self.files)
        self.packed: dict[str, tuple[int, ...]] = {}  # `X.weight` -> (out, in) of each 4-bit linear
        if self.prequantized is not None:
            suffix = f".quant_state.bitsandbytes__{self.prequantized.quant_type}"
            for name in self.read.names():
                if name.endswith(suffix):
                    self.packed[name[: -len(suffix)]] = self._shape(name)
        self.entries = self._entries()

    def _shape(self, state_name: str) -> tuple[int, ...]:
        """(out, in) of a packed linear from its serialized state alone (a few hundred bytes
        of JSON): its scales are read only when the weight is (at 65B they are ~1 GB)."""
        from bitsandbytes.utils import unpack_tensor_to_dict
        try:
            return tuple(unpack_tensor_to_dict(self.read(state_name))["shape"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise QloraError(f"{self.read.label}: {state_name} is not a 4-bit quantization state ({e})") from None

    def _entries(self) -> list[BaseTensor]:
        parts = ({f"{w}.{p.removeprefix('weight.')}" for w in self.packed
                  for p in self.prequantized.required() if p != "weight"} if self.packed else set())
        out = []
        for path in self.files:
            header, _ = read_header(path)
            for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if name in parts:
                    continue
                if name in self.packed:
                    out.append(BaseTensor(name, self.compute_dtype, tuple(self.packed[name]), path))
                    continue
                dtype = SAFETENSORS.get(e["dtype"])
                if dtype is None:
                    raise QloraError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
                out.append(BaseTensor(name, dtype, tuple(e["shape"]), path))
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.packed or name in self.read

    def __call__(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor; a packed linear dequantized (on `device`, returned there)."""
        if name not in self.packed:
            return self.read(name)
        import bitsandbytes as bnb
        codes, state = self.packed_weight(name, device)
        return bnb.functional.dequantize_4bit(codes, state).to(self.compute_dtype)

    def packed_weight(self, name: str, device: str | torch.device = "cpu"):
        """(uint8 codes (n*k/2, 1), bitsandbytes QuantState) of packed linear `name`, on
        `device`, checked against each other as loading checks them."""
        parts = {p: self.read(f"{name}{p.removeprefix('weight')}") for p in self.prequantized.required()}
        state = quant_state(parts, self.compute_dtype, device, self.read.label)
        check_parts(name.removesuffix(".weight"), parts, self.prequantized, self.packed[name], state,
                    self.read.label)
        return parts["weight"].to(device), state


def prequantized_in(folder: Path) -> Prequantized | None:
    """The 4-bit settings of the checkpoint in `folder` (None for a 16/32-bit one), from
    config.json alone."""
    cfg_path = Path(folder) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise QloraError(f"{cfg_path}: cannot read model config ({e})") from None
    return prequantized_settings(SimpleNamespace(quantization_config=cfg.get("quantization_config")),
                                 Path(folder))
