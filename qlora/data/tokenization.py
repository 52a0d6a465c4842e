"""Rendering turns to text, tokenizing with exact label masks, and truncation.

Masks are computed on characters, then mapped to tokens through the fast tokenizer's
offsets, so the ids are exactly what the tokenizer produces for the whole rendered text
(tokenizing prompt and answer separately can merge or split tokens differently at the seam,
e.g. sentencepiece adds a spurious "▁" to a separately tokenized answer).

Chat formats use the tokenizer's chat template when it has one. The characters of each
trained assistant turn are found by incremental rendering: the text between
render(turns[:k], add_generation_prompt=True) and render(turns[:k+1]) is turn k's answer
plus its end-of-turn token. Some templates are not prefix-stable, so when a prefix render is
not a prefix of the full render we locate the answer's text in the full render instead and
extend it over the EOS token that follows. Only the answer's text and its end-of-turn marker
are trained: text a template adds around the *last* answer only (Qwen3's empty think block,
a newline after the marker) would teach the last turn differently from the others.

Every turn's text must survive the template. Mistral v0.3 shows the system message only
inside a *last* user turn, which a training row never has: such a system message is moved to
the start of the first user turn (what inference renders for one exchange) and counted;
any other dropped turn is a row error.

Without a chat template we use DEFAULT_CHAT_TEMPLATE, the Guanaco style:

    ### System: {system}\\n### Human: {user}\\n### Assistant: {assistant}{eos}\\n### Human: ...
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets.fingerprint import Hasher

from qlora.data.formats import CHAT_FORMATS, RowError, Turn, check_format, row_to_turns
from qlora.errors import QloraError

IGNORE_INDEX = -100
DEFAULT_CHAT_TEMPLATE = {"system": "### System: ", "user": "### Human: ", "assistant": "### Assistant: "}
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>", "<|reserved_special_token_0|>")
# Where a conversation's rows are reported in error messages, per format.
_CONVERSATION_FIELD = {"guanaco": "input", "messages": "messages", "sharegpt": "conversations"}
_KEPT, _TRUNCATED, _NO_TARGET, _MALFORMED = 0, 1, 2, 3
_FOLDED = "folded"
_EXAMPLES = 3  # malformed rows quoted in the console report
# Any change to the code that shapes examples must invalidate cached `map` results.
_CODE_HASH = hashlib.sha256(
    b"".join((Path(__file__).parent / f).read_bytes() for f in ("formats.py", "tokenization.py"))
).hexdigest()


@dataclass
class DataStats:
    """What happened to the rows of one data source."""

    rows: int = 0
    kept: int = 0
    dropped_no_target: int = 0  # no assistant turn, nothing but blanks to train, or truncated away
    truncated: int = 0
    skipped_malformed: int = 0
    format: str = ""
    """The row layout the rows were read as (`data.format`, or what 'auto' detected)."""
    malformed_examples: list[str] = field(default_factory=list)  # the first few skipped rows' errors
    system_folded: int = 0  # rows whose system turn went into the first user turn (see Renderer)

    def report(self, source: str) -> list[str]:
        """Console lines for what happened to rows that did not train as written."""
        lines = []
        if self.skipped_malformed:
            lines.append(f"{source}: skipped {self.skipped_malformed} malformed row(s) of {self.rows} "
                         f"(data.skip_malformed); first: " + "; ".join(self.malformed_examples))
        if self.system_folded:
            lines.append(f"{source}: the tokenizer's chat template drops the system message of a "
                         f"conversation that ends with an answer; it was put at the start of the "
                         f"first user turn in {self.system_folded} row(s)")
        return lines


def ensure_pad_token(tokenizer) -> int:
    """Give `tokenizer` a pad token without adding tokens (so no embedding resize).

    Prefers a dedicated or reserved token that is already in the vocabulary (Llama 3.1's
    <|finetune_right_pad_id|>, else a reserved special token), then unk, then eos. Reusing
    eos is safe here because labels are built before padding and pads are masked by
    position, never by id.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    vocab = tokenizer.get_vocab()
    size = len(tokenizer)
    choice = next((c for c in _PAD_CANDIDATES if c in vocab), None)
    choice = choice or next((t for t in (tokenizer.unk_token, tokenizer.eos_token) if t in vocab), None)
    if choice is None:
        raise QloraError("tokenizer has no pad, unk or eos token to use for padding")
    tokenizer.pad_token = choice
    if len(tokenizer) != size or tokenizer.pad_token_id is None:
        raise QloraError(f"setting pad token {choice!r} changed the tokenizer's vocabulary")
    return tokenizer.pad_token_id


@dataclass
class Rendered:
    """Rendered text of one example with character spans of the trained text.

    `cuts` are character offsets where a user turn begins: places where earlier turns can
    be dropped during truncation. `head` is where the first user turn begins (the BOS and
    system prompt before it are kept when earlier turns are dropped).
    """

    text: str
    spans: list[tuple[int, int]]
    cuts: list[int] = field(default_factory=list)
    head: int = 0
    folded_system: bool = False  # the template dropped the system turn; it went into the first user turn


class Renderer:
    """Turns -> Rendered text for one tokenizer and format."""

    def __init__(self, tokenizer, fmt: str, source: str):
        if tokenizer.eos_token is None:
            raise QloraError("tokenizer has no eos token; set one before training")
        if tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"] != [tokenizer.eos_token_id]:
            raise QloraError(f"tokenizer does not encode its eos token {tokenizer.eos_token!r} as one token")
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.source = source
        self.eos = tokenizer.eos_token
        self.use_template = fmt in CHAT_FORMATS and bool(getattr(tokenizer, "chat_template", None))
        self.field = _CONVERSATION_FIELD.get(fmt, fmt)

    def render(self, turns: list[Turn], index: int) -> Rendered:
        if self.use_template:
            return self._render_template(turns, index)
        if self.fmt in CHAT_FORMATS:
            return self._render_default_chat(turns)
        return self._render_plain(turns)

    def _render_plain(self, turns: list[Turn]) -> Rendered:
        """Concatenate turns as they are; each trained turn ends with EOS."""
        text, spans = "", []
        for turn in turns:
            start = len(text)
            text += turn.content
            if turn.trainable:
                text += self.eos
                spans.append((start, len(text)))
        return Rendered(text, spans)

    def _render_default_chat(self, turns: list[Turn]) -> Rendered:
        text, spans, cuts, head = "", [], [], None
        for k, turn in enumerate(turns):
            text += "\n" if k else ""
            if turn.role == "user":
                head = len(text) if head is None else head
                cuts.append(len(text))
            text += DEFAULT_CHAT_TEMPLATE[turn.role]
            start = len(text)
            text += turn.content + (self.eos if turn.role == "assistant" else "")
            if turn.trainable:
                spans.append((start, len(text)))
        return Rendered(text, spans, cuts[1:], head or 0)

    def _apply(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _try_apply(self, messages: list[dict], generation_prompt: bool = False) -> str | None:
        """A prefix render, or None if the template refuses a partial conversation."""
        try:
            return self._apply(messages, generation_prompt)
        except Exception:  # templates raise arbitrary errors on partial chats; fall back
            return None

    def _render_template(self, turns: list[Turn], index: int) -> Rendered:
        full = self._apply_row(turns, index)
        folded = False
        lost = _dropped_turn(turns, full)
        if lost is not None and turns[lost].role == "system":
            # Mistral v0.3's template shows the system message only inside a *last* user turn,
            # which a training row (ending with the answer) never has: the prompt would vanish
            # from training while inference keeps it. Put it where every template shows it.
            turns, folded = _fold_system(turns), True
            full = self._apply_row(turns, index)
            lost = _dropped_turn(turns, full)
        if lost is not None:
            raise RowError(
                f"{self.source}: row {index}: field '{self.field}' turn {lost} ({turns[lost].role}): "
                "the tokenizer's chat template drops its text, so the row would not train as written"
            )
        messages = [{"role": t.role, "content": t.content} for t in turns]
        spans, starts, cursor = [], [], 0
        for k, turn in enumerate(turns):
            if turn.role == "user":
                starts.append(self._turn_start(messages, k, full))
            if turn.trainable:
                span = self._exact_span(messages, k, full) or self._search_span(turns, k, full, cursor, index)
                span = _answer_only(turn, full, span)
                spans.append(span)
                cursor = span[1]
        head = starts[0] if starts and starts[0] is not None else 0
        return Rendered(full, spans, [s for s in starts[1:] if s is not None], head, folded)

    def _apply_row(self, turns: list[Turn], index: int) -> str:
        try:
            return self._apply([{"role": t.role, "content": t.content} for t in turns])
        except Exception as err:
            reason = " ".join(str(err).split())[:200]
            raise RowError(
                f"{self.source}: row {index}: field '{self.field}' is rejected by the "
                f"tokenizer's chat template: {reason}"
            ) from err

    def _turn_start(self, messages: list[dict], k: int, full: str) -> int | None:
        """Where turn k begins in `full`, if the template renders prefixes stably."""
        if k == 0:
            return 0
        prefix = self._try_apply(messages[:k])
        return len(prefix) if prefix is not None and full.startswith(prefix) else None

    def _exact_span(self, messages: list[dict], k: int, full: str) -> tuple[int, int] | None:
        if k == 0:
            return None
        before = self._try_apply(messages[:k], generation_prompt=True)
        upto = self._try_apply(messages[: k + 1])
        if before is None or upto is None:
            return None
        if full.startswith(upto) and upto.startswith(before) and len(upto) > len(before):
            return len(before), len(upto)
        return None

    def _search_span(self, turns: list[Turn], k: int, full: str, cursor: int, index: int) -> tuple[int, int]:
        """Find turn k's answer in the full render, after the user turn that precedes it."""
        previous = next((t for t in reversed(turns[:k]) if not t.trainable and t.content.strip()), None)
        if previous is not None:
            found = full.find(previous.content.strip(), cursor)
            cursor = found + len(previous.content.strip()) if found >= 0 else cursor
        needle = turns[k].content.strip()
        start = full.find(needle or self.eos, cursor)
        if start < 0:
            raise RowError(
                f"{self.source}: row {index}: field '{self.field}' turn {k}: the chat template "
                "changed the assistant text, so its labels cannot be located"
            )
        end = start + len(needle)
        if full.startswith(self.eos, end):
            end += len(self.eos)
        return start, end


def _dropped_turn(turns: list[Turn], full: str) -> int | None:
    """The first turn whose (non-blank) text the rendered conversation does not contain."""
    for k, turn in enumerate(turns):
        if turn.content.strip() and turn.content.strip() not in full:
            return k
    return None


def _fold_system(turns: list[Turn]) -> list[Turn]:
    """The system turn's text moved to the front of the first user turn."""
    system, rest = turns[0], list(turns[1:])
    k = next((i for i, t in enumerate(rest) if t.role == "user"), None)
    if k is None:
        return rest
    rest[k] = Turn("user", f"{system.content}\n\n{rest[k].content}", rest[k].trainable)
    return rest


def _answer_only(turn: Turn, full: str, span: tuple[int, int]) -> tuple[int, int]:
    """Narrow an assistant turn's rendered span to its content and the end-of-turn marker.

    Templates add text around an answer that they add only when it is the last turn (Qwen3:
    an empty <think></think> block before it and a newline after <|im_end|>); training it
    would teach the last turn differently from the others. Whitespace after the end marker
    is never generated at inference, so it is not trained either."""
    start, end = span
    needle = turn.content.strip()
    at = full.find(needle, start, end) if needle else -1
    if at < 0:
        return span
    tail = full[at + len(needle):end].rstrip()
    return at, at + len(needle) + len(tail)


def tokenize(
    ds: datasets.Dataset,
    tokenizer,
    fmt: str,
    *,
    max_seq_len: int,
    train_on_inputs: bool = False,
    source: str = "<data>",
    skip_malformed: bool = False,
) -> tuple[datasets.Dataset, DataStats]:
    """Tokenize raw rows into input_ids, labels (-100 on untrained tokens) and length.

    Runs as a cached, deterministic `Dataset.map`: the cache key covers the data, the
    tokenizer (vocabulary, template, special tokens), every argument and this module's code.
    Malformed rows raise QloraError, or with `skip_malformed` are dropped and counted; rows
    left with no trained token (no assistant turn, or truncated away) are dropped and counted.
    """
    if max_seq_len < 2:
        raise QloraError(f"max_seq_len must be at least 2, got {max_seq_len}")
    check_format(fmt, ds.column_names, source)
    encoder = _Encoder(tokenizer, fmt, source, max_seq_len, train_on_inputs, skip_malformed)
    params = [fmt, max_seq_len, train_on_inputs, skip_malformed, source, _CODE_HASH]
    fingerprint = Hasher.hash([ds._fingerprint, _tokenizer_signature(tokenizer), params])
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "_status": datasets.Value("int8"),
            "_note": datasets.Value("string"),  # a malformed row's error; "folded" (system turn)
        }
    )
    encoded = ds.map(
        encoder,
        batched=True,
        batch_size=256,
        with_indices=True,
        remove_columns=ds.column_names,
        features=features,
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )
    status = encoded["_status"]
    stats = DataStats(
        rows=len(status),
        kept=sum(s in (_KEPT, _TRUNCATED) for s in status),
        dropped_no_target=sum(s == _NO_TARGET for s in status),
        truncated=sum(s == _TRUNCATED for s in status),
        skipped_malformed=sum(s == _MALFORMED for s in status),
        format=fmt,
    )
    if stats.skipped_malformed or encoder.renderer.use_template:
        notes = encoded["_note"]
        stats.malformed_examples = [_shorten(n, source) for s, n in zip(status, notes) if s == _MALFORMED][:_EXAMPLES]
        stats.system_folded = sum(n == _FOLDED for n in notes)
    kept = encoded.filter(
        lambda batch: [s <= _TRUNCATED for s in batch],
        input_columns="_status",
        batched=True,
        new_fingerprint=Hasher.hash([fingerprint, "kept"]),
    )
    return kept.remove_columns(["_status", "_note"]), stats


def _shorten(message: str, source: str) -> str:
    """A row error without the file name the report line already starts with."""
    return message.removeprefix(f"{source}: ")


def _tokenizer_signature(tokenizer) -> str:
    """A stable hash of everything about the tokenizer that changes the produced ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return Hasher.hash(
        [
            type(tokenizer).__name__,
            vocab,
            getattr(tokenizer, "chat_template", None),
            tokenizer.bos_token,
            tokenizer.eos_token,
            tokenizer("a")["input_ids"],
        ]
    )


class _Encoder:
    """The batched `map` function: rows -> tokenized examples with a status code."""

    def __init__(self, tokenizer, fmt, source, max_seq_len, train_on_inputs, skip_malformed):
        if not getattr(tokenizer, "is_fast", False):
            raise QloraError("a fast tokenizer (tokenizer.json) is needed for exact label masks")
        self.tokenizer = tokenizer
        self.renderer = Renderer(tokenizer, fmt, source)
        self.fmt = fmt
        self.source = source
        self.max_seq_len = max_seq_len
        self.train_on_inputs = train_on_inputs
        self.skip_malformed = skip_malformed
        self.bos_id = tokenizer.bos_token_id
        self.tokenizer_adds_bos = adds_bos(tokenizer)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        rendered: list[Rendered | str | None] = []  # a row's rendering, its error, or None: nothing to train
        for row, index in zip(rows, indices):
            try:
                turns = row_to_turns(row, self.fmt, source=self.source, index=index)
                blank = not any(t.trainable and t.content.strip() for t in turns)
                rendered.append(None if blank else self.renderer.render(turns, index))
            except RowError as err:
                if not self.skip_malformed:
                    raise
                rendered.append(str(err))
        texts = [r.text for r in rendered if isinstance(r, Rendered)]
        encoded = (self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts
                   else {"input_ids": [], "offset_mapping": []})  # the tokenizer fails on an empty batch
        pairs = iter(zip(encoded["input_ids"], encoded["offset_mapping"]))
        out = {"input_ids": [], "labels": [], "length": [], "_status": [], "_note": []}
        for r in rendered:
            if isinstance(r, Rendered):
                ids, labels, status = self._example(r, *next(pairs))
                note = _FOLDED if r.folded_system else ""
            else:
                ids, labels = [], []
                status, note = (_NO_TARGET, "") if r is None else (_MALFORMED, r)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["_status"].append(status)
            out["_note"].append(note)
        return out

    def _example(self, r: Rendered, ids: list[int], offsets: list[tuple[int, int]]):
        mask = _span_mask(offsets, r.spans)
        starts = [a for a, _ in offsets]
        cuts = [bisect.bisect_left(starts, c) for c in r.cuts]
        head = bisect.bisect_left(starts, r.head)
        if self.tokenizer_adds_bos and not r.text.startswith(self.tokenizer.bos_token):
            ids, mask = [self.bos_id] + list(ids), [False] + mask
            cuts, head = [c + 1 for c in cuts], head + 1
        bos_len = 1 if ids and self.bos_id is not None and ids[0] == self.bos_id else 0
        ids, mask, truncated = truncate(list(ids), mask, cuts, max(head, bos_len), bos_len, self.max_seq_len)
        labels = list(ids) if self.train_on_inputs else [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
        if all(label == IGNORE_INDEX for label in labels):
            return [], [], _NO_TARGET
        return ids, labels, _TRUNCATED if truncated else _KEPT


def adds_bos(tokenizer) -> bool:
    """Does `tokenizer` put BOS in front of plain text? Rendered text is tokenized without
    special tokens and BOS prepended only where the tokenizer would add one and the text does
    not already start with it (chat templates usually emit it): never two BOS."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos is not None and with_special[:1] == [bos] and without[:1] != [bos]


def encode_with_bos(tokenizer, text: str) -> list[int]:
    """Token ids of rendered `text` with the BOS training puts in front of it (see adds_bos)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer) and not text.startswith(tokenizer.bos_token):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def _span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """True for each token whose characters overlap a trained span.

    Overlap (not containment) so that a token like sentencepiece's "▁Hello", whose offsets
    include the template's separating space, counts as part of the answer.
    """
    mask = []
    for a, b in offsets:
        hit = False
        for s, e in spans:
            if (a < e and b > s) or (a == b and s <= a < e):
                hit = True
                break
        mask.append(hit)
    return mask


def truncate(ids: list[int], mask: list[bool], cuts: list[int], head: int, bos_len: int, max_len: int):
    """Shorten an example to `max_len` tokens, keeping the answer where possible.

    1. Drop the earliest whole exchanges (cut at a user-turn boundary), keeping the `head`
       (BOS and system prompt), if that makes the rest fit with a trained token left.
    2. Else keep BOS, the last tokens of the context before the final answer (at least half
       the budget when the answer is long; truncated context is never trained) and the
       answer, cut from the right only if it alone does not fit.
    Returns (ids, mask, truncated).
    """
    n = len(ids)
    if n <= max_len:
        return ids, mask, False
    if head > max_len // 2:
        head = bos_len  # a huge system prompt is context like any other
    trained_cuts = [c for c in cuts if c > head and any(mask[c:])]
    for c in trained_cuts:
        if head + n - c <= max_len:
            return ids[:head] + ids[c:], mask[:head] + mask[c:], True
    last = trained_cuts[-1] if trained_cuts else bos_len
    first = next((j for j in range(last, n) if mask[j]), n)
    context, answer = ids[bos_len:first], ids[first:]
    budget = max_len - bos_len
    keep_context = min(len(context), max(budget - len(answer), budget // 2))
    keep_answer = budget - keep_context
    new_ids = ids[:bos_len] + context[len(context) - keep_context :] + answer[:keep_answer]
    new_mask = [False] * (bos_len + keep_context) + mask[first : first + keep_answer]
    return new_ids, new_mask, True
