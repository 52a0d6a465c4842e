"""A Hugging Face tokenizer as llama.cpp's GGUF tokenizer: token list, scores or merges, token
types, pre-tokenizer, special token ids, BOS/EOS behaviour and the chat template.

llama.cpp has two tokenizers that cover the Llama family:

* `llama`: SentencePiece-style. Tokens carry scores; adjacent pieces are merged by score
  (llama.cpp's llm_tokenizer_spm). From `tokenizer.model` when present (gguf's own
  SentencePieceVocab, exactly what llama.cpp's converter writes); otherwise from a
  tokenizer.json BPE with byte fallback (Mistral v0.3), scored -rank of the merge that
  builds each token so that merging by score replays the BPE merge order.
* `gpt2`: byte-level BPE with a merge list (Llama 3, SmolLM2, Qwen2). llama.cpp picks its
  pre-tokenizer regex by name (`tokenizer.ggml.pre`); we read the name off tokenizer.json's
  pre_tokenizer, matching the regexes llama.cpp implements (src/llama-vocab.cpp).

Whether the tokenizer adds BOS/EOS is measured on the Hugging Face tokenizer itself.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf

from .errors import QloraError

TokenType = gguf.TokenType
# tokenizer.json pre-tokenizer regexes -> llama.cpp's name for the same split.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
PAD_SCORE = -10000.0  # llama.cpp's converter scores padding tokens so


@dataclass
class Vocab:
    """Everything under `tokenizer.*` in the GGUF."""
    model: str  # tokenizer.ggml.model: "llama" or "gpt2"
    pre: str  # tokenizer.ggml.pre: "default" for "llama"; the regex family for "gpt2"
    tokens: list[bytes]  # by id, padded to the embedding rows with [PAD<id>]
    types: list[int]  # gguf.TokenType per token
    scores: list[float] | None  # "llama" only: merge priority, higher first
    special: gguf.SpecialVocab  # bos/eos/unk/pad ids, merges ("gpt2"), chat template
    add_bos: bool  # the Hugging Face tokenizer prepends BOS
    add_eos: bool  # ... and appends EOS
    add_space_prefix: bool | None  # "llama": prepend "▁" to the text (Metaspace prepend_scheme)
    hf: object  # the transformers tokenizer all this was read from

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(w, quiet=True)  # ids, merges, chat template, add_bos/add_eos


def read_vocab(tokenizer: str, n_vocab: int) -> Vocab:
    """The GGUF vocabulary of `tokenizer` (a folder or a hub id), padded to `n_vocab` tokens."""
    from .model import load_tokenizer
    hf = load_tokenizer(tokenizer)
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        return _read_vocab_dir(path, hf, n_vocab)
    with tempfile.TemporaryDirectory() as tmp:  # a hub id: let transformers write its files
        hf.save_pretrained(tmp)
        return _read_vocab_dir(Path(tmp), hf, n_vocab)


def _read_vocab_dir(path: Path, hf, n_vocab: int) -> Vocab:
    tj_path = path / "tokenizer.json"
    if not tj_path.is_file():
        raise QloraError(f"{path}: GGUF export needs a fast tokenizer (tokenizer.json)")
    try:
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QloraError(f"{tj_path}: invalid JSON ({e})") from None
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise QloraError(f"{tj_path}: model.type {model.get('type')!r} is not supported by GGUF "
                         "export (BPE tokenizers: SentencePiece-style or byte-level)")
    byte_level = (tj.get("decoder") or {}).get("type") == "ByteLevel"
    if byte_level:
        kind, pre = "gpt2", _pre_name(tj_path, tj.get("pre_tokenizer") or {})
        tokens, types, scores = _bpe_tokens(model)
    elif model.get("byte_fallback"):
        kind, pre = "llama", "default"
        if (path / "tokenizer.model").is_file() and _has_sentencepiece():
            tokens, types, scores = _sentencepiece_tokens(path)
        else:
            tokens, types, scores = _scored_tokens(model)
    else:
        raise QloraError(f"{tj_path}: a BPE tokenizer without byte fallback or a ByteLevel decoder "
                         "has no llama.cpp equivalent")
    _overlay_added(tj, tokens, types, scores, unk=model.get("unk_token"))
    if len(tokens) > n_vocab:
        raise QloraError(f"{tj_path}: {len(tokens)} tokens but the model's embedding has only "
                         f"{n_vocab} rows")
    _pad(tokens, types, scores, n_vocab)  # embedding rows no token uses (padded vocabularies)
    quiet = logging.getLogger("gguf.vocab")  # its guesses about unused sep tokens only confuse
    level, quiet.level = quiet.level, logging.ERROR
    try:
        special = gguf.SpecialVocab(path, load_merges=byte_level, n_vocab=n_vocab)
    finally:
        quiet.level = level
    add_bos, add_eos = _adds_bos_eos(hf)
    special.add_special_token["bos"], special.add_special_token["eos"] = add_bos, add_eos
    return Vocab(kind, pre, tokens, types, scores, special, add_bos, add_eos,
                 _space_prefix(tj.get("pre_tokenizer") or {}) if kind == "llama" else None, hf)


def _pre_name(tj_path: Path, pre: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level pre-tokenizer we recognise."""
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own split
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") \
            and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_PRE and parts[0].get("behavior") == "Isolated":
            return SPLIT_PRE[regex]
    raise QloraError(f"{tj_path}: pre_tokenizer {json.dumps(pre)[:120]} matches none of the "
                     "llama.cpp pre-tokenizers GGUF export knows (gpt-2, smollm, llama-bpe, qwen2)")


def _bpe_tokens(model: dict) -> tuple[list[bytes], list[int], None]:
    tokens = _by_id(model["vocab"])
    return [t.encode() for t in tokens], [TokenType.NORMAL] * len(tokens), None


def _scored_tokens(model: dict) -> tuple[list[bytes], list[int], list[float]]:
    """SentencePiece-style tokens from a byte-fallback BPE: score = -rank of the merge that
    builds the token; tokens no merge builds (single characters, bytes) score 0, since llama.cpp
    only ever looks up the score of a merged pair."""
    tokens = _by_id(model["vocab"])
    rank: dict[str, int] = {}
    for i, m in enumerate(model.get("merges", [])):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(left + right, i)
    unk = model.get("unk_token")
    types = [TokenType.BYTE if _BYTE_TOKEN.fullmatch(t) else
             TokenType.UNKNOWN if t == unk else TokenType.NORMAL for t in tokens]
    scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
    return [t.encode() for t in tokens], types, scores


def _sentencepiece_tokens(path: Path) -> tuple[list[bytes], list[int], list[float]]:
    sp = gguf.vocab.SentencePieceVocab(path)
    tokens, scores, types = [], [], []
    for text, score, kind in sp.sentencepiece_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    return tokens, types, scores


def _by_id(vocab: dict[str, int]) -> list[str]:
    tokens: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]


def _overlay_added(tj: dict, tokens: list[bytes], types: list[int], scores: list[float] | None,
                   unk: str | None) -> None:
    """Added tokens (chat markers, control tokens): special ones are CONTROL (never produced
    from plain text, shown only on request), the others USER_DEFINED (matched verbatim)."""
    for tok in tj.get("added_tokens", []):
        i, text = tok["id"], tok["content"]
        _pad(tokens, types, scores, i + 1)
        tokens[i] = text.encode()
        if text == unk or types[i] == TokenType.UNKNOWN:  # sentencepiece knows its unk
            types[i] = TokenType.UNKNOWN
        elif tok.get("special"):
            types[i] = TokenType.CONTROL
        else:
            types[i] = TokenType.USER_DEFINED


def _pad(tokens: list[bytes], types: list[int], scores: list[float] | None, n: int) -> None:
    """Fill ids up to n - 1 with unused [PAD<id>] tokens, as llama.cpp's converter does."""
    for i in range(len(tokens), n):
        tokens.append(f"[PAD{i}]".encode())
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(PAD_SCORE)


def _space_prefix(pre: dict) -> bool | None:
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for p in parts:
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") != "never"
    return None


def _adds_bos_eos(tok) -> tuple[bool, bool]:
    """Does the Hugging Face tokenizer put BOS before / EOS after plain text?"""
    ids = tok("Hello world")["input_ids"]
    plain = tok("Hello world", add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id is not None and len(ids) > len(plain) and ids[0] == tok.bos_token_id
    eos = tok.eos_token_id is not None and len(ids) > len(plain) and ids[-1] == tok.eos_token_id
    return bos, eos


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True
