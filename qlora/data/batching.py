"""Batching: dynamic padding, length-grouped sampling and packing.

Packed rows carry `position_ids` that restart at 0 for every document and no attention
mask. transformers 5.x (`masking_utils.find_packed_sequence_indices`) then treats every
restart of position_ids as a new sequence and builds a block-diagonal causal mask, so
packed documents never attend to each other. That detection only runs when
attention_mask is None and there is no KV cache: train with `use_cache=False`.
"""

from __future__ import annotations

import bisect
from typing import Iterator, Sequence

import datasets
import torch
from datasets.fingerprint import Hasher
from torch.utils.data import Sampler

from qlora.data.tokenization import IGNORE_INDEX


class Collator:
    """Right-pad a list of examples into LongTensors.

    Plain examples give input_ids, attention_mask and labels (-100 on pads). Packed examples
    (with `position_ids`) give input_ids, labels and position_ids, and deliberately no
    attention_mask: its absence is what lets transformers isolate the packed documents. Pads
    get position ids 0, 1, 2, ... so they form a separate "document" of their own.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; call ensure_pad_token(tokenizer) first")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in features[0]
        batch = {"input_ids": [], "labels": [], "position_ids" if packed else "attention_mask": []}
        for f in features:
            n = len(f["input_ids"])
            pad = width - n
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            if packed:
                batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * n + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# Packed examples are collated the same way; the name documents intent at call sites.
PackedCollator = Collator


class GroupByLengthSampler(Sampler[int]):
    """Shuffle, then sort by length inside mega-batches of 50 batches (like HF's).

    Batches cut from the yielded order hold similar lengths, which cuts padding, while the
    mega-batch shuffle keeps the order random. Each index appears exactly once per epoch;
    the order depends only on (seed, epoch). The longest example goes first so an
    out-of-memory error shows up at step 1, not hours in.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, epoch: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * 50
        megabatches = [order[i : i + size] for i in range(0, len(order), size)]
        megabatches = [sorted(m, key=lambda i: -self.lengths[i]) for m in megabatches]
        if megabatches:
            longest = max(range(len(megabatches)), key=lambda k: self.lengths[megabatches[k][0]])
            first, other = megabatches[0], megabatches[longest]
            first[0], other[0] = other[0], first[0]
        return iter([i for m in megabatches for i in m])


def pack(ds: datasets.Dataset, max_seq_len: int) -> datasets.Dataset:
    """Concatenate tokenized examples into rows of at most `max_seq_len` tokens.

    Best-fit decreasing bin packing (deterministic: ties keep index order). Each row gets
    `position_ids` restarting at 0 per document. The first label of every document is set
    to -100: unpacked, the first token is never a target (there is nothing before it to
    predict from), and packed, it must not become a target of the previous document's last
    token. Every example lands in exactly one row.
    """
    lengths = ds["length"]
    too_long = next((i for i, n in enumerate(lengths) if n > max_seq_len), None)
    if too_long is not None:
        raise ValueError(f"example {too_long} has {lengths[too_long]} tokens > max_seq_len {max_seq_len}")
    bins = _best_fit_decreasing(lengths, max_seq_len)
    index = datasets.Dataset.from_dict({"members": bins})
    source = ds.select_columns(["input_ids", "labels"])

    def gather(batch: dict) -> dict:
        out = {"input_ids": [], "labels": [], "position_ids": [], "length": []}
        for members in batch["members"]:
            docs = source[members]
            ids, labels, positions = [], [], []
            for doc_ids, doc_labels in zip(docs["input_ids"], docs["labels"]):
                ids += doc_ids
                labels += [IGNORE_INDEX] + list(doc_labels[1:])
                positions += range(len(doc_ids))
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["position_ids"].append(positions)
            out["length"].append(len(ids))
        return out

    return index.map(
        gather,
        batched=True,
        remove_columns=["members"],
        new_fingerprint=Hasher.hash([ds._fingerprint, max_seq_len, "pack"]),
        desc="packing",
    )


def _best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign each index to the fullest bin it still fits in, longest examples first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin number)
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            space, number = capacity - lengths[i], len(bins) - 1
        else:
            space, number = free.pop(k)
            bins[number].append(i)
            space -= lengths[i]
        bisect.insort(free, (space, number))
    return [sorted(b) for b in bins]
