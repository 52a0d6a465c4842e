"""Hugging Face hub names: telling them from local paths, and fetching model folders.

Light on imports (no torch) because recipes use it while being parsed.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import QloraError

# `owner/name`, or a bare legacy name such as `gpt2`; hub names never contain "..".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# A name ending like a file is a local file someone mistyped, not a hub repository.
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz",
                  ".zst", ".yaml", ".yml", ".safetensors", ".bin")


def looks_like_hub_id(value: str) -> bool:
    """Could `value` name a hub repository rather than a local path?

    True for `owner/name` and bare names; False for anything path-like (absolute, `./`,
    `~`, two or more slashes, a file suffix, or a first component that exists here: then
    it is a local path with a typo). Whether `value` exists locally is the caller's first
    question: local paths always win.
    """
    value = str(value)
    if not _HUB_ID.fullmatch(value) or ".." in value or value.lower().endswith(_FILE_SUFFIXES):
        return False
    return "/" not in value or not Path(value.split("/")[0]).exists()


def local_model_dir(name_or_path: str | Path) -> Path:
    """A local model folder; hub ids are downloaded (or taken from the cache) when online."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        raise QloraError(f"{path}: a file; a model is a folder with config.json and safetensors "
                         "weights (or a hub id)")
    if path.exists():
        if not (path / "config.json").is_file():
            raise QloraError(f"{path}: not a model folder (no config.json)")
        return path
    if not looks_like_hub_id(str(name_or_path)):
        raise QloraError(f"{name_or_path}: model path not found")
    from huggingface_hub import snapshot_download  # only users online get here
    try:
        local = snapshot_download(str(name_or_path), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # network, auth and "no such repo" all end the same way for a user
        raise QloraError(f"{name_or_path}: no such local folder, and cannot download it from the "
                         f"hub ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return Path(local)


def model_id(name_or_path: str | Path) -> str:
    """What an adapter records as its base: the hub id when the model comes from the hub
    (a cache snapshot path means nothing on another machine), else the local path."""
    value = str(name_or_path)
    path = Path(value).expanduser()
    return value if not path.exists() and looks_like_hub_id(value) else str(path)
