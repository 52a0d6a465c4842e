"""Data formats: detection from column names and conversion of rows into turns.

Every supported format is converted into the same shape, a list of `Turn`s, so that
rendering, masking and truncation are written once:

* ``alpaca``            instruction/output[/input] -> one user turn holding the Stanford Alpaca
                        prompt, one trained assistant turn holding ``output``.
* ``guanaco``           ``input``/``output`` where ``input`` is "### Human: ... ### Assistant:"
                        (possibly several turns), or a single ``text`` of such turns. Every
                        "### Assistant:" turn is trained, not only the last.
* ``messages``          OpenAI style ``messages``: a list of {role, content}.
* ``sharegpt``          ``conversations``: a list of {from, value}.
* ``prompt_completion`` ``prompt``/``completion`` strings, concatenated as-is.
* ``text``              plain language-model text, loss on every token.

Tool turns (ShareGPT ``function_call``/``observation``, OpenAI ``tool``): a function call is
what the model must learn to emit, so it becomes a trained assistant turn. An observation is
the tool's answer, which the model reads but never writes, so it becomes an untrained turn
with role ``user``. We use ``user`` rather than ``tool`` because common chat templates either
reject a ``tool`` role without a tool_call_id (Mistral) or demand strict user/assistant
alternation, which function_call -> observation -> gpt keeps only when the observation is a
user turn. A row's ``tools`` schema (ShareGPT) is put into the system turn so the model sees
which functions exist.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from qlora.errors import QloraError

FORMATS = ("alpaca", "guanaco", "messages", "sharegpt", "prompt_completion", "text")
CHAT_FORMATS = frozenset({"guanaco", "messages", "sharegpt"})

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_GUANACO_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:")
_MESSAGES_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "user"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "user",
    "tool": "user",
}
_TRAINED_SOURCE_ROLES = {"assistant", "gpt", "function_call"}


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation; `trainable` turns are the ones that carry labels."""

    role: str  # "system", "user" or "assistant"
    content: str
    trainable: bool


class RowError(QloraError):
    """A malformed row; raised with the full "FILE: row N: field 'X' ..." message."""


def detect_format(
    column_names: Sequence[str], path: str, sample_rows: Iterable[dict] | None = None
) -> str:
    """Pick the data format from the column names (and a few rows, where columns are ambiguous).

    `sample_rows` lets a lone ``text`` column be told apart from Guanaco text ("### Human:"
    turns) and a ``conversations`` column holding role/content items from ShareGPT's
    from/value items. Raises QloraError naming the file and the columns when nothing fits.
    """
    cols = set(column_names)
    rows = list(sample_rows or [])
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    for column in ("messages", "conversations"):
        if column in cols:
            item_keys = _first_item_keys(rows, column)
            if "from" in item_keys or "value" in item_keys:
                return "sharegpt"
            if "role" in item_keys or "content" in item_keys:
                return "messages"
            return "messages" if column == "messages" else "sharegpt"
    if {"input", "output"} <= cols:
        return "guanaco"
    if "text" in cols:
        texts = [r.get("text") for r in rows]
        if any(isinstance(t, str) and "### Human:" in t for t in texts):
            return "guanaco"
        return "text"
    found = ", ".join(sorted(cols)) or "none"
    raise QloraError(
        f"{path}: cannot detect the data format from columns [{found}]; expected alpaca "
        "(instruction, output[, input]), guanaco (input, output), messages (messages), "
        "sharegpt (conversations), prompt_completion (prompt, completion) or text (text); "
        "or pass format= explicitly"
    )


def _first_item_keys(rows: list[dict], column: str) -> set[str]:
    for row in rows:
        items = row.get(column)
        if isinstance(items, list) and items and isinstance(items[0], dict):
            return {k for k, v in items[0].items() if v is not None}
    return set()


def check_format(fmt: str, column_names: Sequence[str], path: str) -> None:
    """Fail early, naming the missing column, when an explicit format does not fit the file."""
    if fmt not in FORMATS:
        raise QloraError(f"unknown data format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    cols = set(column_names)
    needed = {
        "alpaca": [("instruction",), ("output",)],
        "guanaco": [("input", "text")],
        "messages": [("messages", "conversations")],
        "sharegpt": [("conversations", "messages")],
        "prompt_completion": [("prompt",), ("completion",)],
        "text": [("text",)],
    }[fmt]
    for alternatives in needed:
        if not cols & set(alternatives):
            found = ", ".join(sorted(cols)) or "none"
            raise QloraError(
                f"{path}: field '{alternatives[0]}' is missing: format {fmt!r} needs it "
                f"(columns found: [{found}])"
            )


def row_to_turns(row: dict, fmt: str, *, source: str, index: int) -> list[Turn]:
    """Convert one raw row into turns, raising RowError("FILE: row N: field 'X' ...")."""
    ctx = _RowContext(source, index)
    converter = {
        "alpaca": _alpaca,
        "guanaco": _guanaco,
        "messages": _messages,
        "sharegpt": _sharegpt,
        "prompt_completion": _prompt_completion,
        "text": _text,
    }[fmt]
    return converter(row, ctx)


@dataclass(frozen=True)
class _RowContext:
    source: str
    index: int

    def error(self, field: str, problem: str) -> RowError:
        return RowError(f"{self.source}: row {self.index}: field '{field}' {problem}")

    def string(self, value: Any, field: str, *, required: bool = True) -> str:
        """Return `value` if it is a string; None is "missing" (Arrow fills absent keys)."""
        if value is None:
            if required:
                raise self.error(field, "is missing")
            return ""
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__}")
        return value


def _alpaca(row: dict, ctx: _RowContext) -> list[Turn]:
    instruction = ctx.string(row.get("instruction"), "instruction")
    output = ctx.string(row.get("output"), "output")
    extra = ctx.string(row.get("input"), "input", required=False)
    if extra.strip():
        prompt = ALPACA_PROMPT_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return [Turn("user", prompt, False), Turn("assistant", output, True)]


def _prompt_completion(row: dict, ctx: _RowContext) -> list[Turn]:
    prompt = ctx.string(row.get("prompt"), "prompt")
    completion = ctx.string(row.get("completion"), "completion")
    return [Turn("user", prompt, False), Turn("assistant", completion, True)]


def _text(row: dict, ctx: _RowContext) -> list[Turn]:
    return [Turn("assistant", ctx.string(row.get("text"), "text"), True)]


def parse_guanaco(text: str) -> list[Turn]:
    """Split "### Human: a ### Assistant: b ..." into stripped turns.

    Text before the first marker becomes a system turn; a final empty "### Assistant:"
    (the cue for the reply) is dropped; text with no marker at all is one user turn.
    """
    pieces = _GUANACO_MARKER.split(text)
    turns = []
    if pieces[0].strip():
        turns.append(Turn("system" if len(pieces) > 1 else "user", pieces[0].strip(), False))
    for speaker, content in zip(pieces[1::2], pieces[2::2]):
        trainable = speaker == "Assistant"
        turns.append(Turn("assistant" if trainable else "user", content.strip(), trainable))
    if turns and turns[-1].role == "assistant" and not turns[-1].content:
        turns.pop()
    return turns


def _guanaco(row: dict, ctx: _RowContext) -> list[Turn]:
    if row.get("input") is None and "text" in row:
        return parse_guanaco(ctx.string(row.get("text"), "text"))
    turns = parse_guanaco(ctx.string(row.get("input"), "input"))
    output = ctx.string(row.get("output"), "output")
    return turns + [Turn("assistant", output.strip(), True)]


def _messages(row: dict, ctx: _RowContext) -> list[Turn]:
    # a file mixing both spellings has both columns, the other one null
    column = "conversations" if row.get("messages") is None and row.get("conversations") is not None else "messages"
    return _conversation(row, ctx, column, "role", "content", _MESSAGES_ROLES)


def _sharegpt(row: dict, ctx: _RowContext) -> list[Turn]:
    column = "messages" if row.get("conversations") is None and row.get("messages") is not None else "conversations"
    turns = _conversation(row, ctx, column, "from", "value", _SHAREGPT_ROLES)
    system = ctx.string(row.get("system"), "system", required=False).strip()
    tools = row.get("tools")
    if tools:
        tools_text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        system = "\n\n".join(s for s in (system, _TOOLS_PREFIX + tools_text) if s)
    if system:
        if turns and turns[0].role == "system":
            system = f"{system}\n\n{turns.pop(0).content}"
        turns.insert(0, Turn("system", system, False))
    return turns


_TOOLS_PREFIX = "You have access to the following functions:\n"


def _conversation(
    row: dict, ctx: _RowContext, column: str, role_key: str, content_key: str, roles: dict
) -> list[Turn]:
    items = row.get(column)
    if items is None:
        raise ctx.error(column, "is missing")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ctx.error(column, f"must be a list of {{{role_key}, {content_key}}} objects")
    turns = []
    for k, item in enumerate(items):
        role = ctx.string(item.get(role_key), f"{column}[{k}].{role_key}")
        if role not in roles:
            raise ctx.error(
                f"{column}[{k}].{role_key}",
                f"has unknown role {role!r} (expected one of: {', '.join(roles)})",
            )
        content = ctx.string(item.get(content_key), f"{column}[{k}].{content_key}")
        mapped = roles[role]
        turns.append(Turn(mapped, content, role in _TRAINED_SOURCE_ROLES))
    return turns
