"""Training data: load, detect the format, tokenize with exact label masks, batch and pack.

The trainer calls `build_datasets`; the pieces are public for tools and tests:

    load_raw -> detect_format -> tokenize (row_to_turns + Renderer inside) -> pack?
    then Collator / GroupByLengthSampler to batch.

`ensure_pad_token(tokenizer)` must be called before building a `Collator`.
"""

from __future__ import annotations

from collections import Counter

import datasets

from qlora.data.batching import Collator, GroupByLengthSampler, PackedCollator, pack
from qlora.data.formats import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    CHAT_FORMATS,
    FORMATS,
    Turn,
    detect_format,
    parse_guanaco,
    row_to_turns,
)
from qlora.data.loading import load_raw
from qlora.data.tokenization import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    DataStats,
    Renderer,
    encode_with_bos,
    ensure_pad_token,
    tokenize,
    truncate,
)
from qlora.errors import QloraError

__all__ = [
    "ALPACA_PROMPT_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHAT_FORMATS",
    "DEFAULT_CHAT_TEMPLATE",
    "FORMATS",
    "IGNORE_INDEX",
    "Collator",
    "DataStats",
    "GroupByLengthSampler",
    "PackedCollator",
    "Renderer",
    "Turn",
    "build_datasets",
    "detect_format",
    "encode_with_bos",
    "ensure_pad_token",
    "format_of",
    "load_raw",
    "pack",
    "parse_guanaco",
    "row_to_turns",
    "tokenize",
    "truncate",
]

_SAMPLE_ROWS = 8  # rows shown to detect_format where column names are ambiguous


def build_datasets(
    path: str,
    tokenizer,
    *,
    format: str = "auto",
    eval_path: str | None = None,
    eval_ratio: float = 0.0,
    max_seq_len: int = 512,
    train_on_inputs: bool = False,
    packing: bool = False,
    skip_malformed: bool = False,
    seed: int = 0,
    split: str = "train",
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None, DataStats]:
    """Load, tokenize (and optionally pack) the training data and an optional eval set.

    The eval set is `eval_path` (same format rules) or, with `eval_ratio` > 0, a seeded
    random share of the tokenized training examples. The split happens after tokenization so
    that row numbers in error messages are the file's. Returns (train, eval or None, stats),
    where `stats` counts the training file's rows (an eval file is validated the same way).
    """
    if eval_path is not None and eval_ratio > 0:
        raise QloraError("give either eval_path or eval_ratio, not both")
    if not 0.0 <= eval_ratio < 1.0:
        raise QloraError(f"eval_ratio must be in [0, 1), got {eval_ratio}")
    common = dict(format=format, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs,
                  skip_malformed=skip_malformed, split=split, config_name=config_name,
                  cache_dir=cache_dir)
    train, stats = _load_and_tokenize(path, tokenizer, **common)
    evaluation = None
    if eval_path is not None:
        # `split`/`config_name` select from the training source; an eval file is read whole.
        evaluation, _ = _load_and_tokenize(eval_path, tokenizer, **dict(common, split="train", config_name=None))
    elif eval_ratio > 0:
        if len(train) < 2:
            raise QloraError(f"{path}: {len(train)} usable example(s) is too few to split off an eval set")
        parts = train.train_test_split(test_size=eval_ratio, seed=seed, shuffle=True)
        train, evaluation = parts["train"], parts["test"]
    if packing:
        train = pack(train, max_seq_len)
        evaluation = pack(evaluation, max_seq_len) if evaluation is not None else None
    return train, evaluation, stats


def format_of(raw: datasets.Dataset, path: str, skip_malformed: bool = False) -> str:
    """The format of loaded rows, detected row by row.

    A JSON file that mixes formats loads as the union of their columns (absent fields are
    null), so the columns alone would pick one format and then blame valid rows of the
    other. Each row's format is read from the fields it has; the majority wins, and rows
    that disagree are an error (with `skip_malformed`, they are skipped as malformed)."""
    sample = raw.select(range(min(_SAMPLE_ROWS, len(raw)))).to_list()
    fmt = detect_format(raw.column_names, path, sample_rows=sample)
    families = _row_families(raw)
    if families is None:
        return fmt
    counts = Counter(f for f in families if f is not None)
    if len(counts) < 2:
        return fmt
    majority = counts.most_common(1)[0][0]
    cols = [c for c in raw.column_names if c in _FAMILY_COLUMNS[majority]]
    fmt = detect_format(cols, path, sample_rows=[r for r in sample if _family_of_row(_fields(r)) == majority])
    if not skip_malformed:
        others = [i for i, f in enumerate(families) if f != majority]
        kinds = ", ".join(f"{n} are {_FAMILY_NAMES.get(f, f)}" for f, n in Counter(families[i] for i in others).items())
        shown = ", ".join(map(str, others[:5])) + (", ..." if len(others) > 5 else "")
        raise QloraError(
            f"{path}: rows mix data formats: {counts[majority]} of {len(families)} rows are {fmt}, "
            f"{kinds} (rows {shown}); split the file, fix those rows, or set data.skip_malformed"
        )
    return fmt


# Row families by the fields a row has (None or absent = not there); messages vs sharegpt and
# text vs guanaco-text are told apart per file by detect_format, as the fields are the same.
_FAMILY_COLUMNS = {
    "alpaca": ("instruction", "output", "input"),
    "prompt_completion": ("prompt", "completion"),
    "conversation": ("messages", "conversations", "system", "tools"),
    "guanaco": ("input", "output"),
    "text": ("text",),
}


_FAMILY_NAMES = {"conversation": "messages/sharegpt", None: "of no known format"}


def _fields(row: dict) -> set[str]:
    return {k for k, v in row.items() if v is not None}


def _family_of_row(has: set[str]) -> str | None:
    if {"instruction", "output"} <= has:
        return "alpaca"
    if {"prompt", "completion"} <= has:
        return "prompt_completion"
    if has & {"messages", "conversations"}:
        return "conversation"
    if {"input", "output"} <= has:
        return "guanaco"
    if "text" in has:
        return "text"
    return None


def _row_families(raw: datasets.Dataset) -> list[str | None] | None:
    """Each row's family from its non-null fields (read as Arrow null masks, so a million-
    row file costs a second, not a Python pass over its contents); None when the columns
    allow only one family."""
    known = sorted({c for cols in _FAMILY_COLUMNS.values() for c in cols} & set(raw.column_names))
    possible = {_family_of_row(set(cols) & set(known)) for cols in _FAMILY_COLUMNS.values()}
    if len(possible - {None}) < 2:
        return None
    families: list[str | None] = []
    for batch in raw.select_columns(known).with_format("arrow").iter(batch_size=65536):
        present = {c: batch.column(c).is_valid().to_pylist() for c in known}
        for i in range(batch.num_rows):
            families.append(_family_of_row({c for c in known if present[c][i]}))
    return families


def _load_and_tokenize(path, tokenizer, *, format, max_seq_len, train_on_inputs, skip_malformed,
                       split, config_name, cache_dir) -> tuple[datasets.Dataset, DataStats]:
    raw = load_raw(path, split=split, config_name=config_name, cache_dir=cache_dir)
    fmt = format_of(raw, str(path), skip_malformed) if format == "auto" else format
    ds, stats = tokenize(raw, tokenizer, fmt, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs,
                         source=str(path), skip_malformed=skip_malformed)
    if stats.kept == 0:
        raise QloraError(
            f"{path}: no usable examples ({stats.rows} rows: {stats.skipped_malformed} malformed, "
            f"{stats.dropped_no_target} with nothing to train on)"
        )
    return ds, stats
