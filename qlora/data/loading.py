"""Loading raw rows: local files and folders through `datasets`, or a Hugging Face hub name."""

from __future__ import annotations

from pathlib import Path

import datasets

from qlora.errors import QloraError
from qlora.hub import looks_like_hub_id

# File suffix -> `datasets` builder that reads it.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_raw(
    path: str | Path,
    *,
    split: str = "train",
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load raw rows from a .json/.jsonl/.csv/.parquet file, a folder of them, or the hub.

    A hub name ("owner/name") is only tried when no such local path exists, so a typo in a
    local path reports "data file not found" instead of a confusing network error. Local
    files are read through `datasets` so the Arrow cache makes later `map` calls cached.
    `split` may slice local files too ("train[:100]"). `cache_dir` overrides the datasets cache.
    """
    local = Path(path).expanduser()
    if local.is_file():
        files = [local]
    elif local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.suffix.lower() in _BUILDERS and p.is_file())
        if not files:
            raise QloraError(f"{path}: folder holds no .json, .jsonl, .csv or .parquet files")
    elif looks_like_hub_id(str(path)):
        return _load_hub(str(path), split, config_name, cache_dir)
    else:
        raise QloraError(f"data file not found: {path}")
    return _load_local(files, str(path), split, cache_dir)


def _load_local(files: list[Path], label: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    builders = {_BUILDERS.get(f.suffix.lower()) for f in files}
    if None in builders:
        raise QloraError(f"{files[0]}: unsupported file type; use .json, .jsonl, .csv or .parquet")
    if len(builders) > 1:
        raise QloraError(f"{label}: folder mixes file types ({', '.join(sorted(builders))})")
    for f in files:
        if _is_blank(f):
            raise QloraError(f"{f}: data file is empty")
        if f.suffix.lower() != ".parquet":
            _check_utf8(f)
    builder = builders.pop()
    try:
        with _datasets_silent():  # it logs its own parse errors; ours below names the line
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split=split,
                                       cache_dir=cache_dir)
    except Exception as err:  # datasets/pyarrow raise many types; the user needs one line
        if builder == "json":
            for f in files:
                _check_json(f)
        raise QloraError(f"{label}: cannot read data: {_one_line(err)}") from err
    if len(ds) == 0:
        raise QloraError(f"{label}: data file is empty (no rows)")
    return ds


def _load_hub(name: str, split: str, config_name: str | None, cache_dir: str | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir)
    except Exception as err:
        raise QloraError(
            f"data file not found: {name} (and loading it from the hub failed: {_one_line(err)})"
        ) from err


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Text data must be UTF-8: pyarrow's parser would only say "Invalid value" of a row.
    Decoded incrementally, so a multi-GB file costs one read, not its size in memory."""
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                at = offset + e.start
                line += block[:e.start].count(b"\n")
                raise QloraError(f"{path}: not UTF-8 text (byte 0x{block[e.start]:02x} at offset {at}, "
                                 f"line {line}); re-save the file as UTF-8") from None
            offset += len(block)
            line += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise QloraError(f"{path}: not UTF-8 text (it ends inside a multi-byte character)") from None


class _datasets_silent:
    """Within the block, `datasets` logs nothing below CRITICAL."""

    def __enter__(self):
        import logging
        self.logger = logging.getLogger("datasets")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _check_json(path: Path) -> None:
    """After pyarrow failed to read `path`: the line that is not valid JSON, named. A file
    that starts with `[` (or is one object) is one JSON document; otherwise JSON Lines."""
    import json
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise QloraError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if n == 1 and head.startswith("{"):  # perhaps one object over many lines
                    try:
                        json.loads(path.read_text(encoding="utf-8"))
                        return
                    except json.JSONDecodeError:
                        pass
                raise QloraError(f"{path}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise QloraError(f"{path}: line {n} is a JSON {type(row).__name__}, not an object "
                                 "(one example per line: {\"field\": value, ...})")


def _is_blank(path: Path) -> bool:
    """True for a zero-byte, whitespace-only or "[]" text file (parquet is binary, never blank)."""
    if path.stat().st_size == 0:
        return True
    if path.suffix.lower() == ".parquet" or path.stat().st_size > 4096:
        return False
    return path.read_bytes().strip() in (b"", b"[]")


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]
