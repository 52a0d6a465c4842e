"""Tests for qlora.data on the real assets in ../shared/assets (skipped when absent)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
import torch

from qlora.data import (
    Collator,
    GroupByLengthSampler,
    build_datasets,
    detect_format,
    ensure_pad_token,
    load_raw,
    pack,
    tokenize,
)
from qlora.errors import QloraError

from conftest import ASSETS

DATA = ASSETS / "data"
TOKENIZERS = {
    "llama3": ASSETS / "tokenizers" / "llama-3.1-instruct",
    "mistral": ASSETS / "tokenizers" / "mistral-7b-v0.3-instruct",
    "stories": ASSETS / "models" / "stories260K",
}
FILES = {
    "alpaca": "alpaca_5000.json",
    "guanaco": "oasst1_guanaco_val.jsonl",
    "messages": "messages_300.json",
    "sharegpt": "sharegpt_toolcall_300.json",
    "text": "c4_text_300.jsonl",
}
N_ROWS = 20

datasets.disable_progress_bars()


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real asset {path} is absent (see ../shared/assets/README.md)")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


_TOKENIZER_CACHE: dict[str, object] = {}


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[name] = AutoTokenizer.from_pretrained(str(_need(TOKENIZERS[name])))
    return _TOKENIZER_CACHE[name]


def raw_rows(fmt: str, cache_dir: str) -> datasets.Dataset:
    return load_raw(str(_need(DATA / FILES[fmt])), cache_dir=cache_dir).select(range(N_ROWS))


def label_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of trained token ids."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def expected_turns(fmt: str, row: dict) -> tuple[list[str], list[str]]:
    """(assistant texts that must be trained, prompt texts that must not), from the source row.

    Written independently of qlora.data's converters so the tests check them.
    """
    if fmt == "alpaca":
        return [row["output"]], [row["instruction"]]
    if fmt == "guanaco":
        parts = re.split(r"### (Human|Assistant):", row["input"])
        answers = [c.strip() for s, c in zip(parts[1::2], parts[2::2]) if s == "Assistant" and c.strip()]
        questions = [c.strip() for s, c in zip(parts[1::2], parts[2::2]) if s == "Human"]
        return answers + [row["output"].strip()], questions
    if fmt == "messages":
        turns = row["messages"]
        return ([m["content"] for m in turns if m["role"] == "assistant"],
                [m["content"] for m in turns if m["role"] == "user"])
    if fmt == "sharegpt":
        turns = row["conversations"]
        return ([t["value"] for t in turns if t["from"] in ("gpt", "function_call")],
                [t["value"] for t in turns if t["from"] in ("human", "observation")])
    raise AssertionError(fmt)


# ---------------------------------------------------------------------------------------------
# Label masks on the real tokenizers and data


@pytest.mark.parametrize("tok_name", ["llama3", "mistral", "stories"])
@pytest.mark.parametrize("fmt", ["alpaca", "guanaco", "messages", "sharegpt"])
def test_labels_are_exactly_the_answers(fmt, tok_name, cache_dir):
    tok = load_tokenizer(tok_name)
    raw = raw_rows(fmt, cache_dir)
    ds, stats = tokenize(raw, tok, fmt, max_seq_len=65536, source=FILES[fmt])
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped_no_target) == (N_ROWS, N_ROWS, 0, 0)
    chat_template = fmt != "alpaca" and tok.chat_template is not None
    for row, ex in zip(raw, ds):
        ids, labels = ex["input_ids"], ex["labels"]
        answers, prompts = expected_turns(fmt, row)
        runs = [decode(tok, r) for r in label_runs(ids, labels)]
        # Chat templates (and our Guanaco parser) strip turn text; sentencepiece decoding
        # drops the leading space of a run.
        want = [(a.strip() if chat_template or fmt == "guanaco" else a) + tok.eos_token for a in answers]
        if tok_name != "llama3":
            runs, want = [r.lstrip() for r in runs], [w.lstrip() for w in want]
        assert runs == want
        # The prompt is in the input but none of it is trained.
        masked = decode(tok, [i for i, l in zip(ids, labels) if l == -100])
        for prompt in prompts:
            assert prompt.strip()[:40] in masked
        # Exactly one BOS, at the start; the last trained token is the end-of-turn token.
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert [l for l in labels if l != -100][-1] == tok.eos_token_id
        assert ex["length"] == len(ids) == len(labels)


def test_function_call_trained_and_observation_masked(cache_dir):
    tok = load_tokenizer("llama3")
    raw = raw_rows("sharegpt", cache_dir)
    ds, _ = tokenize(raw, tok, "sharegpt", max_seq_len=8192, source="sg")
    row = next(i for i, r in enumerate(raw) if any(t["from"] == "observation" for t in r["conversations"]))
    conv = raw[row]["conversations"]
    call = next(t["value"] for t in conv if t["from"] == "function_call")
    observation = next(t["value"] for t in conv if t["from"] == "observation")
    runs = [decode(tok, r) for r in label_runs(ds[row]["input_ids"], ds[row]["labels"])]
    assert call.strip() + "<|eot_id|>" in runs
    assert not any(observation.strip()[:30] in r for r in runs)
    # The tools schema is shown to the model in the (untrained) system turn.
    assert json.loads(raw[row]["tools"])[0]["name"] in decode(tok, ds[row]["input_ids"][:200])


def test_train_on_inputs_labels_everything(cache_dir):
    tok = load_tokenizer("llama3")
    ds, _ = tokenize(raw_rows("messages", cache_dir), tok, "messages", max_seq_len=8192, train_on_inputs=True)
    for ex in ds:
        assert ex["labels"] == ex["input_ids"]


def test_text_format_trains_everything(cache_dir):
    tok = load_tokenizer("stories")
    raw = raw_rows("text", cache_dir)
    ds, stats = tokenize(raw, tok, "text", max_seq_len=100_000)
    assert stats.kept == N_ROWS
    for row, ex in zip(raw, ds):
        assert ex["labels"][1:] == ex["input_ids"][1:]
        assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
        assert decode(tok, ex["input_ids"][1:-1]) == row["text"]


# ---------------------------------------------------------------------------------------------
# Truncation and dropped examples


def _write_json(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def test_truncation_keeps_the_answer(tmp_path):
    tok = load_tokenizer("llama3")
    answer = "The answer is forty-two."
    rows = [{"instruction": "Summarise this. " + "word " * 400, "input": "", "output": answer}]
    train, _, stats = build_datasets(_write_json(tmp_path / "a.json", rows), tok, max_seq_len=64)
    ex = train[0]
    assert stats.truncated == 1 and len(ex["input_ids"]) == 64
    assert ex["input_ids"][0] == tok.bos_token_id
    assert [decode(tok, r) for r in label_runs(ex["input_ids"], ex["labels"])] == [answer + "<|eot_id|>"]
    # The kept prompt is the end of the prompt, next to the answer.
    assert decode(tok, ex["input_ids"]).endswith("### Response:\n" + answer + "<|eot_id|>")


def test_truncation_drops_earliest_turns(tmp_path):
    tok = load_tokenizer("llama3")
    chat = [{"role": "system", "content": "Be brief."}]
    for k in range(3):
        chat += [{"role": "user", "content": f"Question {k}: " + "tell me more " * 30},
                 {"role": "assistant", "content": f"Answer {k}."}]
    path = _write_json(tmp_path / "m.json", [{"messages": chat}])
    full, _, _ = build_datasets(path, tok, max_seq_len=4096)
    train, _, stats = build_datasets(path, tok, max_seq_len=len(full[0]["input_ids"]) - 20)
    ex = train[0]
    text = decode(tok, ex["input_ids"])
    assert stats.truncated == 1
    assert [decode(tok, r) for r in label_runs(ex["input_ids"], ex["labels"])] == [
        "Answer 1.<|eot_id|>", "Answer 2.<|eot_id|>"]
    assert "Question 0" not in text and "Be brief." in text and text.startswith("<|begin_of_text|><|start")


def test_overlong_answer_is_cut_from_the_right(tmp_path):
    tok = load_tokenizer("mistral")
    rows = [{"prompt": "Count: ", "completion": "one two three " * 200}]
    train, _, stats = build_datasets(_write_json(tmp_path / "p.json", rows), tok, max_seq_len=50)
    ex = train[0]
    assert stats.truncated == 1 and len(ex["input_ids"]) == 50
    assert decode(tok, [l for l in ex["labels"] if l != -100]).startswith("one two three")


def test_no_target_examples_are_dropped_and_counted(tmp_path):
    tok = load_tokenizer("mistral")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "anyone there?"}]},
            {"messages": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}]
    train, _, stats = build_datasets(_write_json(tmp_path / "m.json", rows), tok)
    assert (stats.rows, stats.kept, stats.dropped_no_target) == (3, 2, 1)
    assert len(train) == 2


# ---------------------------------------------------------------------------------------------
# Format detection, loading, eval split, caching


def test_detects_every_asset_format(cache_dir):
    for fmt, name in FILES.items():
        raw = load_raw(str(_need(DATA / name)), cache_dir=cache_dir)
        assert detect_format(raw.column_names, name, raw.select(range(4)).to_list()) == fmt
    assert detect_format(["text"], "g.jsonl", [{"text": "### Human: hi ### Assistant: yo"}]) == "guanaco"


def test_guanaco_text_rows_train_every_assistant_turn(tmp_path):
    tok = load_tokenizer("stories")
    rows = [{"text": "### Human: Hi there ### Assistant: Hello! ### Human: And? ### Assistant: Bye."}]
    train, _, _ = build_datasets(_write_json(tmp_path / "g.json", rows), tok)
    runs = [decode(tok, r) for r in label_runs(train[0]["input_ids"], train[0]["labels"])]
    assert [r.strip() for r in runs] == ["Hello!</s>", "Bye.</s>"]


def test_eval_split_is_deterministic_and_disjoint(cache_dir):
    tok = load_tokenizer("stories")
    path = str(_need(DATA / FILES["alpaca"]))
    kw = dict(eval_ratio=0.25, seed=3, max_seq_len=256, split=f"train[:{N_ROWS}]", cache_dir=cache_dir)
    train, evaluation, stats = build_datasets(path, tok, **kw)
    train2, evaluation2, _ = build_datasets(path, tok, **kw)
    assert len(evaluation) == 5 and len(train) + len(evaluation) == stats.kept == N_ROWS
    assert evaluation["input_ids"] == evaluation2["input_ids"] and train["input_ids"] == train2["input_ids"]
    assert not {tuple(x) for x in train["input_ids"]} & {tuple(x) for x in evaluation["input_ids"]}
    # A separate eval file is tokenized in full; stats count the training file.
    _, evaluation3, stats3 = build_datasets(path, tok, eval_path=str(DATA / FILES["text"]),
                                            max_seq_len=256, split=f"train[:{N_ROWS}]", cache_dir=cache_dir)
    assert len(evaluation3) == 300 and stats3.rows == N_ROWS
    assert json.dumps(vars(stats3))  # the trainer stores these counts in its JSON state


def test_tokenize_is_cached_and_deterministic(cache_dir):
    tok = load_tokenizer("mistral")
    raw = load_raw(str(_need(DATA / FILES["messages"])), cache_dir=cache_dir)
    first, _ = tokenize(raw, tok, "messages", max_seq_len=512)
    second, _ = tokenize(raw, tok, "messages", max_seq_len=512)
    other, _ = tokenize(raw, tok, "messages", max_seq_len=256)
    assert first._fingerprint == second._fingerprint != other._fingerprint
    assert first.cache_files and first.cache_files == second.cache_files
    assert first["input_ids"] == second["input_ids"]


# ---------------------------------------------------------------------------------------------
# Padding, sampling, packing


def test_ensure_pad_token_reuses_existing_tokens():
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(str(_need(TOKENIZERS["llama3"])))
    size = len(llama)
    pad = ensure_pad_token(llama)
    assert len(llama) == size and pad != llama.eos_token_id
    assert llama.pad_token in ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")
    mistral = AutoTokenizer.from_pretrained(str(_need(TOKENIZERS["mistral"])))
    assert ensure_pad_token(mistral) == mistral.unk_token_id and len(mistral) == 32768


def test_collator_pads_right_and_masks_pads():
    batch = Collator(pad_token_id=0, pad_to_multiple_of=4)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    packed = Collator(pad_token_id=0)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 0]},
                                       {"input_ids": [4], "labels": [-100], "position_ids": [0]}])
    assert "attention_mask" not in packed
    assert packed["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]


def test_group_by_length_sampler_covers_each_index_once_per_epoch():
    lengths = torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = GroupByLengthSampler(lengths, batch_size=4, seed=7)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(1000)) and len(sampler) == 1000
    assert epoch0 == list(GroupByLengthSampler(lengths, batch_size=4, seed=7))
    assert epoch0[0] == max(range(1000), key=lambda i: lengths[i])
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch1) == list(range(1000)) and epoch1 != epoch0

    def padding(order):
        batches = [order[i : i + 4] for i in range(0, len(order), 4)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(7)).tolist()
    assert padding(epoch0) < padding(shuffled) / 5


def test_pack_keeps_every_example_once(cache_dir):
    tok = load_tokenizer("stories")
    ds, _ = tokenize(raw_rows("alpaca", cache_dir), tok, "alpaca", max_seq_len=1024)
    packed = pack(ds, 1024)
    assert len(packed) < len(ds)
    docs = []
    for row in packed:
        assert len(row["input_ids"]) == row["length"] <= 1024
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [row["length"]]
        for a, b in zip(starts, starts[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == -100
            docs.append((tuple(row["input_ids"][a:b]), tuple(row["labels"][a + 1 : b])))
    original = [(tuple(x["input_ids"]), tuple(x["labels"][1:])) for x in ds]
    assert sorted(docs) == sorted(original)


def test_packed_loss_equals_unpacked_loss(cache_dir):
    from transformers import AutoModelForCausalLM

    model_dir = _need(TOKENIZERS["stories"])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = load_tokenizer("stories")
    ds, _ = tokenize(raw_rows("alpaca", cache_dir).select(range(10)), tok, "alpaca", max_seq_len=1024)
    packed = pack(ds, 1024)
    assert len(packed) < len(ds)

    def summed_loss(batch):
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum")

    collate = Collator(pad_token_id=ensure_pad_token(tok))
    unpacked = sum(summed_loss(collate([ex])) for ex in ds)
    packed_batch = collate(list(packed))  # several packed rows, padded: pads are a "document" too
    assert "attention_mask" not in packed_batch
    assert torch.allclose(summed_loss(packed_batch), unpacked, rtol=1e-5, atol=1e-4)
    # Control: with a plain attention mask the documents see each other and the loss changes.
    leaky = dict(packed_batch, attention_mask=(packed_batch["labels"] > -200).long())
    leaky.pop("position_ids")
    assert not torch.allclose(summed_loss(leaky), unpacked, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Bad input: every user error is a one-line QloraError naming file, row and field


BAD_INPUTS = {
    "missing_field": ("a.json", [{"instruction": "x", "output": "y"}, {"instruction": "x", "output": "y"},
                                 {"instruction": "x"}], ["row 2", "'output'", "missing"]),
    "unknown_role": ("m.json", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                                {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}],
                     ["row 1", "'messages[1].role'", "'bot'"]),
    "non_string_content": ("s.json", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                                      {"conversations": [{"from": "human", "value": 123}, {"from": "gpt", "value": "yo"}]}],
                           ["row 1", "'conversations[0].value'", "must be a string, got int"]),
    "undetectable": ("u.json", [{"question": "q", "answer": "a"}], ["cannot detect", "[answer, question]"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_one_line_error(case, tmp_path):
    tok = load_tokenizer("stories")
    name, rows, needles = BAD_INPUTS[case]
    path = _write_json(tmp_path / name, rows)
    with pytest.raises(QloraError) as err:
        build_datasets(path, tok)
    message = str(err.value)
    assert "\n" not in message and message.startswith(path)
    for needle in needles:
        assert needle in message


def test_missing_and_empty_files(tmp_path):
    tok = load_tokenizer("stories")
    missing = str(tmp_path / "nope.json")
    with pytest.raises(QloraError, match=re.escape(f"data file not found: {missing}")):
        build_datasets(missing, tok)
    with pytest.raises(QloraError, match="data file not found: nope/absent"):
        load_raw("nope/absent.jsonl")
    for name, content in [("empty.jsonl", ""), ("blank.json", "  \n"), ("nothing.json", "[]")]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(QloraError, match=re.escape(str(path)) + ".*empty"):
            build_datasets(str(path), tok)


def test_explicit_format_overrides_and_checks_columns(tmp_path):
    tok = load_tokenizer("stories")
    path = _write_json(tmp_path / "t.json", [{"text": "### Human: a ### Assistant: b"}])
    train, _, _ = build_datasets(path, tok, format="text")
    assert train[0]["labels"][1:] == train[0]["input_ids"][1:]
    with pytest.raises(QloraError, match=r"t\.json: field 'instruction' is missing"):
        build_datasets(path, tok, format="alpaca")
    with pytest.raises(QloraError, match="unknown data format 'chatml'"):
        build_datasets(path, tok, format="chatml")


def test_skip_malformed_skips_and_counts(tmp_path):
    tok = load_tokenizer("llama3")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    rows = [good, {"messages": [{"role": "robot", "content": "x"}]}, good,
            {"messages": [{"role": "user", "content": None}]}, good]
    path = _write_json(tmp_path / "m.json", rows)
    with pytest.raises(QloraError, match="row 1: field 'messages"):
        build_datasets(path, tok)
    train, _, stats = build_datasets(path, tok, skip_malformed=True)
    assert (stats.rows, stats.kept, stats.skipped_malformed) == (5, 3, 2) and len(train) == 3
