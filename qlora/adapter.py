"""Adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, exactly what
`peft.PeftModel.save_pretrained` writes (PEFT strips its adapter name, `default`, on save), so
`PeftModel.from_pretrained` loads ours unchanged and we load PEFT's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import write_atomically
from .config import LoraConfig
from .dtypes import SAFETENSORS, dtype_name
from .errors import QloraError
from .lora import add_lora, lora_layers
from .safetensors_io import TensorReader, check_intact

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
    return out


def peft_config(s: LoraConfig, targets: list[str], base_model: str) -> dict:
    """PEFT's LoraConfig fields that matter for loading; everything else takes PEFT's defaults."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout, "use_rslora": s.rslora,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }


def write_adapter_files(model: nn.Module, folder: Path, base_model: str | None = None) -> None:
    """Write the two adapter files into an existing folder (not atomic: see save_adapter)."""
    s: LoraConfig = model.qlora_lora
    targets = sorted({n.rsplit(".", 1)[-1] for n in lora_layers(model)})
    base = base_model or getattr(model, "qlora_source", "") or ""
    save_file(adapter_state_dict(model), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(peft_config(s, targets, base), indent=2) + "\n")


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write the adapter to `out_dir` atomically (a complete folder or none)."""
    write_atomically(Path(out_dir), lambda tmp: write_adapter_files(model, tmp, base_model))
    return Path(out_dir)


def read_adapter_config(adapter_dir: str | Path) -> tuple[LoraConfig, dict]:
    """The adapter's settings (the recipe's `lora` section, as one type) and its raw config."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise QloraError(f"{adapter_dir}: not an adapter folder (no {CONFIG_NAME})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QloraError(f"{path}: invalid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise QloraError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise QloraError(f"{path}: missing field '{key}'")
    targets = cfg["target_modules"]
    if isinstance(targets, str):  # PEFT allows a regex or "all-linear"; we take "all-linear"
        if targets != "all-linear":
            raise QloraError(f"{path}: target_modules regex {targets!r} is not supported; list names")
    try:
        s = LoraConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                       dropout=float(cfg.get("lora_dropout", 0.0)), targets=targets,
                       rslora=bool(cfg.get("use_rslora", False)))
    except (QloraError, TypeError, ValueError) as e:
        raise QloraError(f"{path}: {e}") from None
    return s, cfg


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Add LoRA layers to `model` as the adapter describes, then load its weights (strict)."""
    s, state = read_adapter_weights(adapter_dir)
    if not lora_layers(model):
        add_lora(model, s)
    load_adapter_weights(model, state, source=str(Path(adapter_dir) / WEIGHTS_NAME))
    return model


def read_adapter_weights(adapter_dir: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The adapter's settings, with `dtype` that of its stored factors, and its factors."""
    s, _ = read_adapter_config(adapter_dir)
    check_adapter_weights(Path(adapter_dir))
    state = load_file(str(Path(adapter_dir) / WEIGHTS_NAME))
    dtype = factor_dtype(next(iter(state.values())).dtype if state else torch.bfloat16)
    return dataclasses.replace(s, dtype=dtype), state


def check_adapter_weights(adapter_dir: Path) -> None:
    """One line, before any model is loaded, when the adapter's weights file is missing,
    truncated or not safetensors (headers only)."""
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise QloraError(f"{adapter_dir}: missing {WEIGHTS_NAME}")
    check_intact(weights)


def load_adapter_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    layers = lora_layers(model)
    seen = set()
    for key, value in state.items():
        module_path, which = factor_key(key, source)
        layer = layers.get(module_path)
        if layer is None:
            raise QloraError(f"{source}: tensor {key} matches no LoRA layer of this model")
        param = getattr(layer, which).weight
        if param.shape != value.shape:
            raise QloraError(f"{source}: {key} has shape {tuple(value.shape)}, "
                             f"model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value)
        seen.add((module_path, which))
    missing = [f"{n}.{w}" for n in layers for w in ("lora_A", "lora_B") if (n, w) not in seen]
    if missing:
        raise QloraError(f"{source}: no tensor for {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def factor_key(key: str, source: str) -> tuple[str, str]:
    """`base_model.model.<module>.lora_A.weight` -> (<module>, "lora_A"); PEFT's in-memory
    names with the adapter name (`lora_A.default.weight`) are accepted too."""
    k = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    module_path, _, which = k[len(PREFIX): -len(".weight")].rpartition(".")
    if not k.startswith(PREFIX) or not k.endswith(".weight") or which not in ("lora_A", "lora_B"):
        raise QloraError(f"{source}: unexpected tensor {key}")
    return module_path, which


@dataclass
class Delta:
    """One adapted linear's factors: the update is scaling * B @ A."""
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)


class AdapterFactors(Mapping):
    """{checkpoint weight name (`<module>.weight`): Delta}, each read from the adapter file
    only when asked for: a 65B adapter at r 64 is ~1.6 GB, which a streaming export or
    verification should not hold while it works on one tensor."""

    def __init__(self, adapter_dir: Path):
        weights = Path(adapter_dir) / WEIGHTS_NAME
        if not weights.is_file():
            raise QloraError(f"{adapter_dir}: missing {WEIGHTS_NAME}")
        self.read = TensorReader([weights])
        keys: dict[str, dict[str, str]] = {}
        for key in self.read.names():
            module_path, which = factor_key(key, str(weights))
            keys.setdefault(module_path + ".weight", {})[which] = key
        for name, pair in keys.items():
            if set(pair) != {"lora_A", "lora_B"}:
                missing = ({"lora_A", "lora_B"} - set(pair)).pop()
                raise QloraError(f"{weights}: no {missing} tensor for {name[:-len('.weight')]}")
        self.keys = keys

    def __getitem__(self, name: str) -> Delta:
        pair = self.keys[name]
        return Delta(self.read(pair["lora_A"]), self.read(pair["lora_B"]))

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dtype(self) -> torch.dtype:
        """The stored factors' dtype (bf16 when there are none)."""
        first = next(iter(self.read.entries.values()), None)
        return SAFETENSORS[first[1]["dtype"]] if first else torch.bfloat16


def factor_dtype(stored: torch.dtype) -> str:
    """The LoRA dtype that holds stored factors exactly: theirs (bf16/fp32), fp32 for others."""
    return dtype_name(stored) if stored in (torch.bfloat16, torch.float32) else "float32"
