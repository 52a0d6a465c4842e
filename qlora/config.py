"""Recipes: typed, validated training configuration read from YAML.

A recipe is a YAML file with four sections that map one-to-one onto the dataclasses
below::

    model: {name_or_path: huggyllama/llama-7b}
    lora:  {r: 64, alpha: 16}
    data:  {path: timdettmers/openassistant-guanaco, format: guanaco}
    train: {output_dir: runs/guanaco-7b, max_steps: 1875}

Every field has a type, a default (unless required) and a docstring written right
under it; `describe_fields()` turns those into the `qlora train --help` text. Types and
values are checked in `__post_init__`, so a `Recipe` that exists is a valid one.
`load_recipe` adds the file name to every error, applies `--set section.key=value`
overrides and resolves relative local paths against the working directory. It never
checks that paths exist; the trainer does that when it opens them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Union

import yaml

from qlora.errors import QloraError
from qlora.hub import looks_like_hub_id

Quantization = Literal["nf4", "fp4", "none"]
Offload = Literal["none", "cpu", "disk"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]
LoraDtype = Literal["auto", "bfloat16", "float32"]
DataFormat = Literal["auto", "alpaca", "guanaco", "messages", "sharegpt", "prompt_completion", "text"]
Schedule = Literal["constant", "cosine", "linear"]
Optimizer = Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_torch"]
NanPolicy = Literal["stop", "skip"]


# --------------------------------------------------------------------------- sections


class _Section:
    """Shared validation for the four recipe sections.

    `__post_init__` checks every field against its annotation (bool is not an int, an
    int is accepted and converted for a float field, choices must match exactly), then
    calls `_check_values` for the section's range and cross-field checks.
    """

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            key = self._key(f.name)
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], key))
        self._check_values()

    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}"

    def _check_values(self) -> None:
        """Range and cross-field checks; overridden by each section."""

    def _require(self, ok: bool, name: str, requirement: str) -> None:
        if not ok:
            value = getattr(self, name)
            raise QloraError(f"{self._key(name)}: must be {requirement}, got {_show(value)}")

    def _require_text(self, name: str) -> None:
        value = getattr(self, name)
        self._require(value is None or value.strip() != "", name, "a non-empty string")


@dataclass
class ModelConfig(_Section):
    """The base model and how it is quantized."""

    SECTION: ClassVar[str] = "model"

    name_or_path: str
    """Hugging Face hub id (owner/name) or local directory of the base model."""
    quantization: Quantization = "nf4"
    """Weight format of the frozen base: 4-bit NormalFloat, 4-bit float, or unquantized."""
    double_quant: bool = True
    """Also quantize the 4-bit blocks' scales (saves ~0.37 bits/parameter); ignored for 'none'."""
    compute_dtype: ComputeDtype = "bfloat16"
    """Dtype the 4-bit weights are dequantized to for matmuls (and of unquantized layers). float16 is for GPUs without bf16 (T4, V100): training then uses dynamic loss scaling and, with lora.dtype auto, fp32 LoRA factors."""
    tokenizer: str | None = None
    """Hub id or local directory of the tokenizer; null means the same as model.name_or_path."""
    offload: Offload = "none"
    """Where the 4-bit weights of the decoder layers past model.resident_layers live between uses: 'cpu' (pinned host memory on a GPU machine; copies overlap compute) or 'disk' (a file read per layer, so a model larger than memory trains); each layer is brought in just before it runs and the next one prefetched. Same numbers as 'none'."""
    offload_dir: str | None = None
    """Folder for model.offload disk's layer file; null means RUN_DIR/offload (also when `qlora generate`/`eval` run the run's adapter; each process's file is removed when it exits)."""
    resident_layers: int | Literal["auto"] = "auto"
    """With model.offload: how many decoder layers (the first ones) stay on the compute device; 'auto' keeps as many as its free memory allows after a reserve of 20% (at least 1.5 GiB)."""
    cache_dir: str | None = None
    """Keep a pre-quantized 4-bit copy of a 16-bit checkpoint here after its first load and load that next time (skips quantizing; rebuilt when the source or settings change)."""

    def _check_values(self) -> None:
        self._require_text("name_or_path")
        self._require_text("tokenizer")
        self._require_text("offload_dir")
        self._require_text("cache_dir")
        if self.tokenizer is None:
            self.tokenizer = self.name_or_path
        if self.resident_layers != "auto":
            self._require(self.resident_layers >= 0, "resident_layers", ">= 0 or 'auto'")
        if self.offload == "none":
            for name in ("offload_dir", "resident_layers"):
                if getattr(self, name) not in (None, "auto"):
                    raise QloraError(f"{self._key(name)}: only used with model.offload cpu or disk "
                                     f"(model.offload is none)")
        elif self.quantization == "none":
            raise QloraError(f"{self._key('offload')}: streams 4-bit weights; it needs "
                             "model.quantization nf4 or fp4")
        if self.offload == "cpu" and self.offload_dir is not None:
            raise QloraError(f"{self._key('offload_dir')}: only used with model.offload: disk")


@dataclass
class LoraConfig(_Section):
    """The trainable low-rank adapters."""

    SECTION: ClassVar[str] = "lora"

    r: int = 64
    """Rank of each adapter (the inner dimension of B @ A)."""
    alpha: float = 16
    """Scale numerator: the adapter output is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.1
    """Dropout on the adapter input during training, in [0, 1)."""
    targets: list[str] | Literal["all-linear"] = "all-linear"
    """Linear layers to adapt: 'all-linear' (every linear layer but the LM head, as in the paper) or a list of module-name suffixes such as [q_proj, v_proj]."""
    rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(r) instead of alpha / r."""
    dtype: LoraDtype = "auto"
    """Dtype of the adapter weights and their arithmetic; 'auto' is float32 (as PEFT): bf16 factors cannot take an Adam update below ~0.4% of themselves, and cost 0.004 eval loss on SmolLM2 (benchmarks/README.md, fidelity). bfloat16 halves their memory."""
    fuse_shared_inputs: bool = True
    """Adapters of projections that read the same input (q/k/v; gate/up) draw one dropout mask and run one GEMM for their A factors together; false gives each its own mask, as PEFT does. Saved adapters are the same either way."""

    def resolved_dtype(self) -> str:
        """The adapter dtype this section means ('auto' resolved)."""
        return "float32" if self.dtype == "auto" else self.dtype

    @property
    def scaling(self) -> float:
        """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rslora (rsLoRA keeps the
        update's scale stable as r grows, Kalajdzievski 2023). The one definition of it."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def _check_values(self) -> None:
        self._require(self.r >= 1, "r", ">= 1")
        self._require(self.alpha > 0, "alpha", "> 0")
        self._require(0 <= self.dropout < 1, "dropout", "in [0, 1)")
        if isinstance(self.targets, list):
            self._require(len(self.targets) > 0, "targets", "'all-linear' or a non-empty list")
            for i, target in enumerate(self.targets):
                if not target.strip():
                    raise QloraError(f"{self._key('targets')}[{i}]: must be a non-empty module name")


@dataclass
class DataConfig(_Section):
    """The training (and evaluation) data and how it becomes token sequences."""

    SECTION: ClassVar[str] = "data"

    path: str
    """Hub dataset id (owner/name) or local .json/.jsonl/.csv/.parquet file or directory."""
    format: DataFormat = "auto"
    """Row layout; 'auto' detects it from the first rows' keys."""
    eval_path: str | None = None
    """Separate evaluation set (hub id or local file), in the same format as data.path."""
    eval_ratio: float = 0.0
    """Fraction of data.path held out for evaluation when data.eval_path is not set, in [0, 1); 0 means no evaluation."""
    max_seq_len: int = 512
    """Examples are truncated to this many tokens (and packed up to it with data.packing)."""
    train_on_inputs: bool = False
    """Compute the loss on prompt/user tokens too, not only on responses."""
    group_by_length: bool = True
    """Batch examples of similar length together to waste less padding; ignored with data.packing."""
    packing: bool = False
    """Concatenate examples into full max_seq_len sequences instead of padding each one."""
    split: str = "train"
    """Split to train on when data.path is a hub dataset."""
    config_name: str | None = None
    """Configuration (subset) name of a hub dataset that has several."""
    skip_malformed: bool = False
    """Skip rows that do not fit data.format (and count them) instead of stopping at the first one."""

    def _check_values(self) -> None:
        for name in ("path", "eval_path", "split", "config_name"):
            self._require_text(name)
        self._require(0 <= self.eval_ratio < 1, "eval_ratio", "in [0, 1)")
        if self.eval_path is not None and self.eval_ratio > 0:
            raise QloraError(
                f"{self._key('eval_ratio')}: set either data.eval_path or data.eval_ratio, not both"
            )
        self._require(self.max_seq_len >= 8, "max_seq_len", ">= 8")


@dataclass
class TrainConfig(_Section):
    """The optimization loop, checkpoints and logging."""

    SECTION: ClassVar[str] = "train"

    output_dir: str
    """Directory for checkpoints, logs and the final adapter."""
    max_steps: int = -1
    """Optimizer steps to train for; -1 means train for train.epochs instead."""
    epochs: float = 1.0
    """Passes over the training data when train.max_steps is -1 (fractions allowed)."""
    batch_size: int = 1
    """Sequences per forward/backward pass."""
    grad_accum: int = 16
    """Passes accumulated per optimizer step; the effective batch is batch_size * grad_accum."""
    lr: float = 2e-4
    """Peak learning rate of the adapters."""
    schedule: Schedule = "constant"
    """Learning-rate shape after warmup."""
    warmup_ratio: float = 0.03
    """Fraction of all steps spent warming the learning rate up linearly from 0, in [0, 1)."""
    optimizer: Optimizer = "paged_adamw_32bit"
    """AdamW variant; the paged ones move optimizer state to CPU memory under GPU memory pressure."""
    max_grad_norm: float = 0.3
    """Clip the global gradient norm to this value; 0 disables clipping."""
    weight_decay: float = 0.0
    """Decoupled AdamW weight decay."""
    eval_steps: int = 200
    """Evaluate every this many optimizer steps (when there is an evaluation set)."""
    save_steps: int = 250
    """Save an adapter checkpoint every this many optimizer steps."""
    save_total_limit: int = 3
    """Keep at most this many checkpoints: the newest, and the one with the lowest eval loss among those evaluated at their own step (with a limit of 1, only the newest)."""
    seed: int = 42
    """Seed for shuffling, the evaluation split, dropout and adapter initialization."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less activation memory for extra compute."""
    keep_matmuls_gb: float = 0.0
    """With checkpointing: memory (GB) it may spend keeping the 4-bit base matmuls' outputs of as
    many decoder layers as fit (batch_size x max_seq_len x their output widths x 2 bytes each;
    on CPU plus the attention output, batch_size x max_seq_len x heads x (head_dim x 2 + 4)),
    so backward does not recompute them: ~1/3 less matmul work and no attention forward per
    kept layer. 0 keeps none."""
    logging_steps: int = 10
    """Log loss, learning rate and throughput every this many optimizer steps."""
    nan_policy: NanPolicy = "stop"
    """On a NaN/inf loss or gradient: 'stop' the run, or 'skip' that step and continue."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts generated from at each evaluation to watch the model learn; each is rendered as the training data's prompts are (the Alpaca template for alpaca data, the chat template for chat formats, as-is for text and prompt_completion), so write only the question."""
    sample_max_new_tokens: int = 64
    """Tokens generated for each of train.sample_prompts."""
    eval_max_batches: int = 0
    """Cap on batches per evaluation; 0 evaluates the whole evaluation set."""

    def _check_values(self) -> None:
        self._require_text("output_dir")
        self._require(self.max_steps >= 1 or self.max_steps == -1, "max_steps",
                      ">= 1, or -1 to train for train.epochs")
        self._require(self.epochs > 0, "epochs", "> 0")
        self._require(self.batch_size >= 1, "batch_size", ">= 1")
        self._require(self.grad_accum >= 1, "grad_accum", ">= 1")
        self._require(self.lr > 0, "lr", "> 0")
        self._require(0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)")
        self._require(self.max_grad_norm >= 0, "max_grad_norm", ">= 0")
        self._require(self.weight_decay >= 0, "weight_decay", ">= 0")
        self._require(self.eval_steps >= 1, "eval_steps", ">= 1")
        self._require(self.save_steps >= 1, "save_steps", ">= 1")
        self._require(self.save_total_limit >= 1, "save_total_limit", ">= 1")
        self._require(0 <= self.seed < 2**32, "seed", "in [0, 2**32)")
        self._require(self.logging_steps >= 1, "logging_steps", ">= 1")
        self._require(self.keep_matmuls_gb >= 0, "keep_matmuls_gb", ">= 0")
        self._require(self.sample_max_new_tokens >= 1, "sample_max_new_tokens", ">= 1")
        self._require(self.eval_max_batches >= 0, "eval_max_batches", ">= 0 (0 = whole eval set)")


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
}
"""Recipe section name -> dataclass, in file order."""


@dataclass
class Recipe:
    """A complete, validated training recipe."""

    model: ModelConfig
    lora: LoraConfig
    data: DataConfig
    train: TrainConfig
    source: str | None = field(default=None, compare=False)
    """File the recipe was loaded from (as given), for messages; None if built in code."""

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"Recipe.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    @property
    def effective_batch_size(self) -> int:
        """Sequences per optimizer step."""
        return self.train.batch_size * self.train.grad_accum


# --------------------------------------------------------------------------- type checks


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _show(value: Any) -> str:
    """A short one-line rendering of a user value for error messages."""
    text = repr(value) if isinstance(value, str) else " ".join(_render(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _yaml_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _describe_type(tp: Any) -> str:
    """Readable name of an annotation, for messages and `describe_fields`."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if tp in (bool, int, float, str):
        return {bool: "bool", int: "int", float: "float", str: "str"}[tp]
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(tp))
    if origin is list:
        return f"list[{_describe_type(typing.get_args(tp)[0])}]"
    if origin in (Union, types.UnionType):
        return " | ".join(_describe_type(arg) for arg in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, tp: Any, value: Any) -> QloraError:
    got = "null" if value is None else f"{_yaml_type(value)} {_show(value)}"
    return QloraError(f"{key}: expected {_describe_type(tp)}, got {got}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; return it (ints become floats for float fields)."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise QloraError(f"{key}: must be a finite number, got {_show(value)}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        if isinstance(value, str):
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listed = ", ".join(repr(choice) for choice in choices)
            raise QloraError(f"{key}: must be one of {listed}, got {value!r}{hint}")
    elif origin is list:
        if isinstance(value, list):
            (item_type,) = typing.get_args(tp)
            return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    elif origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except QloraError:
                # A list given for a list-or-choice field: its own message says which item is wrong.
                if isinstance(value, list) and typing.get_origin(arg) is list:
                    raise
    else:
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise _type_error(key, tp, value)


# --------------------------------------------------------------------------- field docs


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring literal written right under the field in `cls`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _render(value: Any) -> str:
    """A value as it would be written in YAML (flow style, one line)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return str(value)


def describe_fields() -> str:
    """Every recipe key with its type, default and docstring (the `qlora train --help` text)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:  {inspect.cleandoc(cls.__doc__ or '')}")
        hints = _type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f"default {_render(f.default)}"
            elif f.default_factory is not dataclasses.MISSING:
                default = f"default {_render(f.default_factory())}"
            else:
                default = "required"
            lines.append(f"  {section}.{f.name} ({_describe_type(hints[f.name])}; {default})")
            for doc_line in textwrap.wrap(docs.get(f.name, ""), width=88):
                lines.append(f"      {doc_line}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- YAML


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML loader that reads `2e-4` as a float and rejects duplicate keys.

    PyYAML follows YAML 1.1, where a float needs a dot (`2.0e-4`); `lr: 2e-4` would
    otherwise silently be the string '2e-4'.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str) -> Any:
    """Parse YAML text; raise QloraError with a one-line message (no file prefix)."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise QloraError(f"YAML syntax error{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise QloraError(f"YAML syntax error: {' '.join(str(exc).split())}") from None


def _read_yaml(source: str) -> Any:
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QloraError(f"{source}: recipe file not found") from None
    except IsADirectoryError:
        raise QloraError(f"{source}: is a directory, expected a YAML recipe file") from None
    except UnicodeDecodeError:
        raise QloraError(f"{source}: not a UTF-8 text file") from None
    except OSError as exc:
        raise QloraError(f"{source}: cannot read recipe: {exc.strerror}") from None
    try:
        return _parse_yaml(text)
    except QloraError as exc:
        raise QloraError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------- loading


# Hugging Face Trainer / PEFT spellings of recipe keys, for "did you mean" hints.
_ALIASES = {
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.targets",
    "model_name_or_path": "model.name_or_path",
    "bits": "model.quantization",
    "quant_type": "model.quantization",
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.schedule",
    "optim": "train.optimizer",
    "dataset": "data.path",
    "model_max_length": "data.max_seq_len",
}


def _suggest_key(section: str, key: str) -> str:
    """' (did you mean ...?)' for an unknown `section.key`, or ''."""
    names = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
    # The right key in the wrong section is the most likely mistake.
    for other, other_names in names.items():
        if key in other_names:
            return f" (did you mean '{other}.{key}'?)"
    if key in _ALIASES:
        return f" (did you mean '{_ALIASES[key]}'?)"
    close = difflib.get_close_matches(key, names[section], n=1)
    if close:
        return f" (did you mean '{section}.{close[0]}'?)"
    for other, other_names in names.items():
        close = difflib.get_close_matches(key, other_names, n=1)
        if close:
            return f" (did you mean '{other}.{close[0]}'?)"
    # An abbreviation or an elaboration of a key: 'rank' -> 'r', 'grad' -> 'grad_accum'.
    related = [n for n in names[section] if key.startswith(n) or n.startswith(key)]
    if related:
        return f" (did you mean '{section}.{max(related, key=len)}'?)"
    return ""


def _suggest_section(name: str) -> str:
    # A key written at the top level instead of inside its section.
    for section, cls in SECTIONS.items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            return f" (did you mean '{section}.{name}'?)"
    close = difflib.get_close_matches(name, list(SECTIONS), n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (sections are {', '.join(SECTIONS)})"


def _check_key(section: str, key: Any, origin: str = "") -> None:
    names = {f.name for f in dataclasses.fields(SECTIONS[section])}
    if key not in names:
        raise QloraError(f"unknown key '{section}.{key}'{origin}{_suggest_key(section, str(key))}")


def _sections(raw: Any) -> dict[str, dict[str, Any]]:
    """Split a parsed recipe into per-section dicts, rejecting unknown sections and keys."""
    if raw is None:
        raise QloraError(f"recipe is empty; expected sections {', '.join(SECTIONS)}")
    if not isinstance(raw, dict):
        raise QloraError(f"top level must be a mapping with sections {', '.join(SECTIONS)}, got {_yaml_type(raw)}")
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise QloraError(f"unknown section '{name}'{_suggest_section(str(name))}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise QloraError(f"{name}: expected a mapping of keys, got {_yaml_type(body)} {_show(body)}")
        for key, value in body.items():
            _check_key(name, key)
            sections[name][key] = value
    return sections


def _apply_override(sections: dict[str, dict[str, Any]], override: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML."""
    where = f" in --set {override!r}"
    if not isinstance(override, str) or "=" not in override:
        raise QloraError(f"bad --set {override!r}: expected section.key=value")
    dotted, _, text = override.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not dot or not section or not key or "." in key:
        raise QloraError(f"bad --set {override!r}: expected section.key=value")
    if section not in SECTIONS:
        raise QloraError(f"unknown section '{section}'{where}{_suggest_section(section)}")
    _check_key(section, key, where)
    try:
        value = _parse_yaml(text)
    except QloraError as exc:
        raise QloraError(f"bad --set {override!r}: value is not valid YAML ({exc})") from None
    sections[section][key] = value


def _build(sections: dict[str, dict[str, Any]], source: str | None) -> Recipe:
    parts = {}
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in sections[name]:
                raise QloraError(f"missing required key '{name}.{f.name}'")
        parts[name] = cls(**sections[name])
    return Recipe(**parts, source=source)


def recipe_from_dict(data: Any, source: str | None = None) -> Recipe:
    """Build and validate a Recipe from a `{section: {key: value}}` mapping.

    The inverse of `recipe_to_dict`. Paths are taken as they are (no resolution).
    Errors are prefixed with `source` when given.
    """
    try:
        return _build(_sections(data), source)
    except QloraError as exc:
        raise QloraError(f"{source}: {exc}" if source else str(exc)) from None


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override, validate and path-resolve a YAML recipe.

    `overrides` are `section.key=value` strings (from `--set`), the value parsed as
    YAML, applied before validation. Relative local paths in model.name_or_path,
    model.tokenizer, data.path, data.eval_path and train.output_dir become absolute
    (against the current directory); hub ids such as `owner/name` that do not exist
    locally are kept as given. No path is required to exist.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'section.key=value' strings, not one string")
    source = os.fspath(path)
    raw = _read_yaml(source)
    try:
        sections = _sections(raw)
        for override in overrides:
            _apply_override(sections, override)
        recipe = _build(sections, source)
    except QloraError as exc:
        raise QloraError(f"{source}: {exc}") from None
    return _resolve_paths(recipe)


# --------------------------------------------------------------------------- paths

def _resolve_local(value: str, *, may_be_hub_id: bool) -> str:
    """Absolute form of a local path; a hub id (`owner/name`, no local match) as given."""
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    if may_be_hub_id and looks_like_hub_id(value) and not os.path.exists(expanded):
        return value
    return os.path.abspath(expanded)


def _resolve_paths(recipe: Recipe) -> Recipe:
    model = dataclasses.replace(
        recipe.model,
        name_or_path=_resolve_local(recipe.model.name_or_path, may_be_hub_id=True),
        tokenizer=_resolve_local(recipe.model.tokenizer, may_be_hub_id=True),
        offload_dir=None if recipe.model.offload_dir is None
        else _resolve_local(recipe.model.offload_dir, may_be_hub_id=False),
        cache_dir=None if recipe.model.cache_dir is None
        else _resolve_local(recipe.model.cache_dir, may_be_hub_id=False),
    )
    eval_path = recipe.data.eval_path
    data = dataclasses.replace(
        recipe.data,
        path=_resolve_local(recipe.data.path, may_be_hub_id=True),
        eval_path=None if eval_path is None else _resolve_local(eval_path, may_be_hub_id=True),
    )
    train = dataclasses.replace(
        recipe.train, output_dir=_resolve_local(recipe.train.output_dir, may_be_hub_id=False)
    )
    return dataclasses.replace(recipe, model=model, data=data, train=train)


# --------------------------------------------------------------------------- saving


def recipe_to_dict(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """Every key of every section, as plain YAML-safe values (source is not included)."""
    return {name: dataclasses.asdict(getattr(recipe, name)) for name in SECTIONS}


def save_resolved(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the fully resolved recipe as YAML; `load_recipe(path)` gives back an equal Recipe."""
    target = Path(path)
    header = (
        f"# Fully resolved qlora recipe (from {recipe.source or 'code'}): every key spelled\n"
        f"# out, local paths absolute. It loads like any recipe.\n"
    )
    body = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False, width=10**6)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(header + body, encoding="utf-8")
    os.replace(partial, target)
