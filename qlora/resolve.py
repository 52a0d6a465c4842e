"""What a folder handed to `export`, `generate` or `eval` is, and how training used it.

    resolve("runs/guanaco-7b")                    # a run: RUN/adapter + RUN/recipe.yaml
    resolve("runs/guanaco-7b/checkpoint-000040")  # a checkpoint: its adapter + the run's recipe
    resolve("my-adapter")                         # a PEFT adapter folder, no recipe
    resolve("merged-7b")                          # a full model: an export, or any base
    resolve("meta-llama/Llama-2-7b-hf")           # a hub model (downloaded when online)

Every command rebuilds the model the same way from the answer: the base, the adapter, the
quantization settings training used (quantization, double_quant, compute_dtype: an adapter
corrects one particular 4-bit base, so evaluating it on another is evaluating something
else), the tokenizer, and the data format prompts were rendered in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import quant
from .adapter import CONFIG_NAME, check_adapter_weights, read_adapter_config
from .checkpoint import PATTERN as CHECKPOINT_PATTERN
from .dtypes import dtype_named
from .errors import QloraError
from .hub import local_model_dir, looks_like_hub_id, model_id
from .base_checkpoint import prequantized_in

log = logging.getLogger(__name__)

EXPORT_INFO = "qlora_export.json"  # written by `qlora export` next to the merged weights


@dataclass
class QuantSettings:
    """How the frozen base was held in training; the defaults are training's defaults."""
    quantization: str = "nf4"
    """nf4, fp4 or none (16-bit)."""
    double_quant: bool = True
    """Whether the 4-bit blocks' scales were themselves quantized."""
    compute_dtype: torch.dtype = torch.bfloat16
    """Dtype the 4-bit weights were dequantized to, and of every other base weight."""


@dataclass
class Placement:
    """Where the frozen base lives while the model runs, as the run's recipe placed it in
    training (model.offload, resident_layers, offload_dir, cache_dir): a 65B base streamed
    from disk in training has to be streamed in generation and evaluation too."""
    offload: str = "none"
    """none, cpu or disk (see offload.py)."""
    resident_layers: int | str = "auto"
    """Decoder layers kept on the device when offloading."""
    offload_dir: Path | None = None
    """Scratch folder of the disk home: the run's (RUN/offload unless the recipe names one)."""
    cache_dir: Path | None = None
    """Where the pre-quantized copy of a 16-bit base is kept."""


@dataclass
class ModelSource:
    """The answer to "what is this folder", enough to rebuild the model training saw."""
    path: Path
    """The folder (or hub id) as given."""
    kind: str
    """"run", "checkpoint", "adapter" or "model" (a full model: an export or a base)."""
    model: Path
    """Local folder of the base weights (for kind "model", of the model itself)."""
    model_id: str
    """The base as training named it: a hub id, or a local path."""
    adapter: Path | None
    """The adapter folder; None for a full model."""
    quant: QuantSettings | None
    """Quantization settings of the base under the adapter; None for a full model (loaded
    in its own dtype)."""
    tokenizer: str
    """Folder or hub id of the tokenizer training used."""
    data_format: str | None
    """The training data's format (alpaca, messages, text, ...), when known: prompts are
    rendered the same way."""
    settings_from: str
    """Where `quant` came from: "recipe", "default", "checkpoint" (a pre-quantized base's own
    format), "arguments", or one of the first three "+arguments"."""
    final: bool = True
    """False when a run without its final adapter resolved to its latest checkpoint."""
    placement: Placement = field(default_factory=Placement)
    """Where the base lived in training (a run's recipe; defaults otherwise)."""


def resolve(source: str | Path, *, base: str | Path | None = None, quantization: str | None = None,
            double_quant: bool | None = None, compute_dtype: str | torch.dtype | None = None) -> ModelSource:
    """Find the base, adapter, quantization settings, tokenizer and data format of `source`.

    `base`, `quantization`, `double_quant`, `compute_dtype` override what the run's recipe
    (or, for a bare adapter, training's defaults) says. A run killed before its final
    adapter resolves to its latest checkpoint (`final` False).
    """
    path = Path(source).expanduser()
    found = locate_adapter(path)
    if found is None:
        if (path / "config.json").is_file() or (not path.exists() and looks_like_hub_id(str(source))):
            return _full_model(source, base)
        raise QloraError(f"{source}: not a run, checkpoint, adapter or model folder "
                         f"(no recipe.yaml, {CONFIG_NAME} or config.json)")
    kind, adapter, recipe_file, final = found.kind, found.adapter, found.recipe, found.final

    _, cfg = read_adapter_config(adapter)
    check_adapter_weights(adapter)  # before any base is read: a damaged adapter is one line
    recipe = None
    if recipe_file is not None:
        from .config import load_recipe
        recipe = load_recipe(recipe_file)
    base_name = base or (recipe.model.name_or_path if recipe else None) or cfg.get("base_model_name_or_path")
    if not base_name:
        raise QloraError(f"{adapter / CONFIG_NAME}: base_model_name_or_path is empty; "
                         "pass the base model (--base)")
    base_path = local_model_dir(base_name)
    own_tokenizer = recipe is not None and recipe.model.tokenizer != recipe.model.name_or_path
    q, origin = _quant_settings(recipe, quantization, double_quant, compute_dtype, prequantized_in(base_path))
    return ModelSource(
        path=path, kind=kind, model=base_path, model_id=model_id(base_name), adapter=adapter,
        quant=q, tokenizer=recipe.model.tokenizer if own_tokenizer else str(base_path),
        data_format=_data_format(recipe), settings_from=origin, final=final,
        placement=_placement(recipe, recipe_file))


@dataclass
class AdapterLocation:
    """Where the adapter of a run, checkpoint or adapter folder is."""
    kind: str
    """"run", "checkpoint" or "adapter"."""
    adapter: Path
    """The folder holding adapter_config.json."""
    recipe: Path | None
    """The run's recipe.yaml (for a run and its checkpoints), else None."""
    final: bool
    """False when a run without its final adapter points to its latest checkpoint."""


def locate_adapter(path: Path) -> AdapterLocation | None:
    """The adapter that folder `path` names: its own (an adapter, RUN/adapter or
    RUN/checkpoint-N), a run's final one, or a run's latest checkpoint when the run did not
    finish. None when `path` holds no adapter (a model folder, a hub id, nothing). Reads no
    weights and no base: `qlora inspect` needs only this."""
    if (path / "recipe.yaml").is_file() and not (path / CONFIG_NAME).is_file():  # a run
        if (path / "adapter" / CONFIG_NAME).is_file():
            return AdapterLocation("run", path / "adapter", path / "recipe.yaml", True)
        ckpts = checkpoints(path)
        if not ckpts:
            raise QloraError(f"{path}: run has no adapter yet (no adapter/{CONFIG_NAME} "
                             "and no checkpoint-N folder)")
        return AdapterLocation("run", ckpts[-1], path / "recipe.yaml", False)
    if (path / CONFIG_NAME).is_file():  # an adapter, RUN/adapter or RUN/checkpoint-N
        recipe = path.parent / "recipe.yaml" if (path.parent / "recipe.yaml").is_file() else None
        kind = "checkpoint" if recipe and CHECKPOINT_PATTERN.match(path.name) else "adapter"
        return AdapterLocation(kind, path, recipe, True)
    if (path / "adapter" / CONFIG_NAME).is_file():
        return AdapterLocation("adapter", path / "adapter", None, True)
    return None


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint-N folders that hold an adapter, oldest first. A folder with this
    name is complete: checkpoints are published by rename (atomic.py)."""
    found = [p for p in run_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and (p / CONFIG_NAME).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def _full_model(source: str | Path, base) -> ModelSource:
    if base is not None:
        raise QloraError(f"{source}: a full model has no adapter, so --base does not apply")
    folder = local_model_dir(source)
    data_format = None
    info = folder / EXPORT_INFO
    if info.is_file():  # an export of ours: prompt it the way its run was trained
        try:
            data_format = json.loads(info.read_text()).get("data_format")
        except json.JSONDecodeError as e:
            raise QloraError(f"{info}: invalid JSON ({e})") from None
    return ModelSource(path=Path(source), kind="model", model=folder, model_id=model_id(source),
                       adapter=None, quant=None, tokenizer=str(folder), data_format=data_format,
                       settings_from="model")


def _quant_settings(recipe, quantization, double_quant, compute_dtype, pre) -> tuple[QuantSettings, str]:
    """From the arguments, else the recipe, else the pre-quantized base's own format (`pre`),
    else training's defaults."""
    m = recipe.model if recipe is not None else None
    fallback = QuantSettings() if pre is None else QuantSettings(pre.quant_type, pre.double_quant)
    q = QuantSettings(
        quantization=quantization or (m.quantization if m else fallback.quantization),
        double_quant=bool(double_quant if double_quant is not None
                          else (m.double_quant if m else fallback.double_quant)),
        compute_dtype=dtype_named(compute_dtype or (m.compute_dtype if m else "bfloat16"), "compute_dtype"))
    if q.quantization not in (*quant.QUANT_TYPES, "none"):
        raise QloraError(f"quantization: expected nf4, fp4 or none, got {q.quantization!r}")
    given = (quantization, double_quant, compute_dtype)
    if all(v is not None for v in given):
        return q, "arguments"
    default = "default" if pre is None else "checkpoint"
    return q, ("recipe" if m else default) + ("+arguments" if any(v is not None for v in given) else "")


def _placement(recipe, recipe_file: Path | None) -> Placement:
    if recipe is None:
        return Placement()
    m = recipe.model
    return Placement(offload=m.offload, resident_layers=m.resident_layers,
                     offload_dir=Path(m.offload_dir) if m.offload_dir else recipe_file.parent / "offload",
                     cache_dir=Path(m.cache_dir) if m.cache_dir else None)


def _data_format(recipe) -> str | None:
    """The run's data format. Recipes saved by the trainer name it; an "auto" recipe (saved
    before they did) is detected again from its data when that is a local file."""
    if recipe is None:
        return None
    if recipe.data.format != "auto":
        return recipe.data.format
    if not Path(recipe.data.path).exists():
        return None  # a hub dataset: not worth a download to pick a prompt template
    from .data import format_of, load_raw
    try:
        return format_of(load_raw(recipe.data.path, split=recipe.data.split,
                                  config_name=recipe.data.config_name), recipe.data.path,
                         recipe.data.skip_malformed)
    except QloraError as e:
        log.warning("cannot tell the run's data format (%s); prompts use the default rendering", e)
        return None
