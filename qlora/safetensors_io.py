"""Stream tensors out of (sharded) safetensors checkpoints, one at a time.

Why not `safetensors.safe_open`? It memory-maps the whole file, and every page it touches
counts towards the process RSS until the file is closed: streaming a 13 GB shard through it
shows a 13 GB peak. Here we parse the (tiny, documented) header ourselves and `readinto` each
tensor's bytes into a fresh tensor, so the only memory held is the tensor being worked on.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import torch

from .dtypes import SAFETENSORS
from .errors import QloraError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_header(path: Path) -> tuple[dict, int]:
    """Return (tensor entries, byte offset where tensor data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise QloraError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:  # a garbage length would otherwise be allocated
            raise QloraError(f"{path}: not a safetensors file (header of {n:,} bytes in a file of {size:,})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QloraError(f"{path}: not a safetensors file ({e.__class__.__name__} in header)") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def check_intact(path: Path) -> None:
    """Raise a one-line QloraError when `path` is not a whole safetensors file: unreadable
    header, a header that is not a tensor table, or data cut short (a copy or save that was
    killed). Reads only the header."""
    if not Path(path).is_file():
        raise QloraError(f"{path}: file is missing")
    try:
        header, start = read_header(path)
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
    except (KeyError, TypeError, IndexError, AttributeError, struct.error):
        raise QloraError(f"{path}: not a safetensors file (malformed header)") from None
    size = Path(path).stat().st_size
    if size < start + end:
        raise QloraError(f"{path}: truncated ({size:,} of {start + end:,} bytes)")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint folder, sharded or single.

    A shard listed in the index but absent on disk is an error naming that shard: we would
    otherwise load a model with silently missing weights.
    """
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise QloraError(f"{index}: malformed index ({e})") from None
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise QloraError(f"{f}: shard listed in {index.name} is missing")
        return files
    if (model_dir / SINGLE_NAME).exists():
        return [model_dir / SINGLE_NAME]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    return []


def read_tensor(f, entry: dict, data_start: int, path: Path, name: str) -> torch.Tensor:
    """Read one tensor's bytes from an open file into a new (owned) tensor."""
    dtype = SAFETENSORS.get(entry["dtype"])
    if dtype is None:
        raise QloraError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    out = torch.empty(entry["shape"], dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if end - begin != nbytes:
        raise QloraError(f"{path}: tensor {name} has {end - begin} bytes, expected {nbytes}")
    f.seek(data_start + begin)
    if nbytes and f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != nbytes:
        raise QloraError(f"{path}: truncated file while reading tensor {name}")
    return out


def iter_entries(files: list[Path]) -> Iterator[tuple[str, "Entry"]]:
    """Yield (name, entry) for every tensor of every file, in on-disk order, without reading
    it: `entry.read()` reads it, `entry.offset` is where its bytes start in `entry.path`."""
    for path in files:
        header, data_start = read_header(path)
        with open(path, "rb") as f:
            for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                yield name, Entry(path, f, name, meta, data_start)


class Entry:
    """One tensor of an open safetensors file."""

    def __init__(self, path: Path, f, name: str, meta: dict, data_start: int):
        self.path, self.f, self.name, self.meta, self.data_start = path, f, name, meta, data_start
        self.offset = data_start + meta["data_offsets"][0]
        self.nbytes = meta["data_offsets"][1] - meta["data_offsets"][0]
        self.dtype = SAFETENSORS.get(meta["dtype"])
        self.shape = tuple(meta["shape"])

    def read(self) -> torch.Tensor:
        return read_tensor(self.f, self.meta, self.data_start, self.path, self.name)


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every file, in on-disk order."""
    for name, entry in iter_entries(files):
        yield name, entry.read()


def tensor_names(files: list[Path]) -> dict[str, Path]:
    """Map every tensor name to the file holding it (reads headers only)."""
    return {name: path for path in files for name in read_header(path)[0]}


class TensorReader:
    """Single tensors by name from safetensors files (headers read once, data on demand):
    `reader("model.layers.3.mlp.up_proj.weight")` returns a new tensor holding only that
    tensor's bytes. Callable as `name -> tensor`, the shape export's verification takes."""

    def __init__(self, files: list[Path]):
        self.label = str(files[0] if len(files) == 1 else files[0].parent) if files else "<no files>"
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for path in files:
            header, data_start = read_header(path)
            for name, entry in header.items():
                if name in self.entries:
                    raise QloraError(f"{path}: tensor {name} also appears in {self.entries[name][0].name}")
                self.entries[name] = (path, entry, data_start)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise QloraError(f"{self.label}: no tensor {name}")
        path, entry, data_start = self.entries[name]
        with open(path, "rb") as f:
            return read_tensor(f, entry, data_start, path, name)
