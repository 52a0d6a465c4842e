"""Several adapters on one loaded 4-bit base, switched without reloading it.

    adapters = AdapterSet.load({"poems": "runs/poems", "code": "runs/code"}, device="cpu")
    adapters.use("code")      # the base stays; only the LoRA layers change
    adapters.model(...)

The LoRA paper's promise of modularity: one frozen base, many cheap task adapters. A 65B base
takes minutes to load and ~34 GB to hold; an adapter a few hundred MB at most. All adapters
of a set must have been trained on the same base with the same 4-bit settings (an adapter
corrects one particular quantized base), so the base is loaded once, as training held it,
and each adapter's factors (read once, kept in host memory) are put in place on `use`:
exactly the model `load_adapter` would build for that adapter alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from .adapter import WEIGHTS_NAME, load_adapter_weights, read_adapter_weights
from .config import LoraConfig
from .errors import QloraError
from .lora import add_lora, remove_lora
from .resolve import ModelSource, resolve


def parse_adapter_flags(values: list[str]) -> dict[str, str]:
    """`["poems=runs/poems", ...]` (the repeatable --adapter NAME=PATH) -> {name: path}."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise QloraError(f"--adapter: expected NAME=PATH, got {v!r}")
        if name in out:
            raise QloraError(f"--adapter: name {name!r} given twice")
        out[name.strip()] = path.strip()
    return out


@dataclasses.dataclass
class AdapterSet:
    model: torch.nn.Module
    """The base with the LoRA layers of the adapter in use (`current`)."""
    tokenizer: object
    sources: dict[str, ModelSource]
    """Each adapter's resolved source (its data format renders its prompts)."""
    current: str | None = None
    _adapters: dict[str, tuple[LoraConfig, dict[str, torch.Tensor]]] = dataclasses.field(default_factory=dict)
    """name -> (settings, factors), read once."""

    @classmethod
    def load(cls, adapters: dict[str, str | Path], *, base: str | Path | None = None,
             expect_base: Path | None = None, device=None) -> "AdapterSet":
        """Resolve every adapter (run, checkpoint or adapter folder; `base` overrides the base
        each names), check that they share one base (`expect_base`, when given) and its 4-bit
        settings, load that base once, and use the first adapter."""
        from .generate import load_base
        from .model import load_tokenizer, resolve_device
        if not adapters:
            raise QloraError("--adapter: give at least one NAME=PATH")
        sources = {name: resolve(path, base=base) for name, path in adapters.items()}
        for name, src in sources.items():
            if src.adapter is None:
                raise QloraError(f"--adapter {name}={adapters[name]}: a full model, not an adapter "
                                 "(run, checkpoint or adapter folder)")
        first, ref = next(iter(sources.items()))
        if expect_base is not None and ref.model.resolve() != Path(expect_base).resolve():
            raise QloraError(f"--adapter {first}: trained on {ref.model}, not on the MODEL given "
                             f"({expect_base})")
        for name, src in sources.items():
            for what, mine, theirs in (("base", src.model.resolve(), ref.model.resolve()),
                                       ("4-bit settings", src.quant, ref.quant),
                                       ("tokenizer", src.tokenizer, ref.tokenizer)):
                if mine != theirs:
                    raise QloraError(f"--adapter {name}: its {what} ({_show(mine)}) differs from "
                                     f"{first}'s ({_show(theirs)}); adapters of a set share one base")
        read = {name: read_adapter_weights(src.adapter) for name, src in sources.items()}
        # the base, once, the way training held it (placement included)
        model = load_base(ref, resolve_device(device))
        self = cls(model, load_tokenizer(ref.tokenizer), sources, _adapters=read)
        self.use(first)
        return self

    def use(self, name: str) -> torch.nn.Module:
        """Put adapter `name` on the base (its own r, alpha, targets and factors)."""
        if name not in self.sources:
            raise QloraError(f"no adapter named {name!r} (have {', '.join(self.sources)})")
        if name == self.current:
            return self.model
        s, state = self._adapters[name]
        remove_lora(self.model)
        add_lora(self.model, s)  # fresh factors on each base layer's device, then the adapter's
        load_adapter_weights(self.model, state, source=str(self.sources[name].adapter / WEIGHTS_NAME))
        self.model.eval()
        self.current = name
        return self.model


def _show(v) -> str:
    if hasattr(v, "quantization"):
        return f"{v.quantization}, double_quant {v.double_quant}, {str(v.compute_dtype).removeprefix('torch.')}"
    return str(v)
