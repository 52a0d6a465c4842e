"""Every dtype name qlora accepts or writes, in one table.

Recipes and adapters spell dtypes the way `torch` does (`bfloat16`); the command line also
takes the short forms (`--dtype fp16`); safetensors headers use their own codes (`BF16`).
"""

from __future__ import annotations

import torch

from .errors import QloraError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHORT_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# safetensors header code -> dtype (the codes qlora reads and writes)
SAFETENSORS = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS.items()}


def dtype_named(value: str | torch.dtype, field: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    """The torch dtype for `value` ("bfloat16", "bf16" or a torch.dtype), one of `allowed`
    (long names); a QloraError naming `field` otherwise."""
    name = value if isinstance(value, str) else dtype_name(value)
    name = SHORT_NAMES.get(name, name)
    if name not in allowed:
        short = {v: k for k, v in SHORT_NAMES.items()}
        choices = ", ".join(f"{short[a]} ({a})" for a in allowed)
        raise QloraError(f"{field}: expected one of {choices}, got {value!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the name configs and recipes use."""
    return str(dtype).removeprefix("torch.")
