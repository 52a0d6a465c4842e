"""Data that would not train as the user wrote it: templates that drop or add text, files
that mix formats, rows that are skipped or empty (issue #14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora.data import build_datasets
from qlora.errors import QloraError

from test_data import decode, label_runs, load_tokenizer


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def test_mistral_keeps_the_system_prompt_as_inference_shows_it(tmp_path):
    """Mistral v0.3 renders a system message only inside a *last* user turn, so a training
    row (ending with the answer) lost it while inference kept it."""
    tok = load_tokenizer("mistral")
    chat = [{"role": "system", "content": "Answer like a pirate."},
            {"role": "user", "content": "Where is the treasure?"},
            {"role": "assistant", "content": "Under the palm, matey."}]
    assert "pirate" not in tok.apply_chat_template(chat, tokenize=False)  # the template's own behaviour
    train, _, stats = build_datasets(_write(tmp_path / "m.json", [{"messages": chat}]), tok)
    ex = train[0]
    text = decode(tok, ex["input_ids"])
    # The prompt part is exactly what inference renders for the same system + user turns.
    prompt = tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and "Answer like a pirate." in text
    assert [decode(tok, r).strip() for r in label_runs(ex["input_ids"], ex["labels"])] == [
        "Under the palm, matey.</s>"]
    assert stats.system_folded == 1
    assert any("drops the system message" in line for line in stats.report("m.json"))


def test_sharegpt_tool_schema_reaches_mistral_training_text(tmp_path):
    tok = load_tokenizer("mistral")
    row = {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                             {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
                             {"from": "observation", "value": '{"temp": 3}'},
                             {"from": "gpt", "value": "It is 3 degrees."}],
           "tools": '[{"name": "weather", "parameters": {"city": "string"}}]'}
    train, _, stats = build_datasets(_write(tmp_path / "s.json", [row]), tok)
    text = decode(tok, train[0]["input_ids"])
    assert '"name": "weather", "parameters"' in text and "Weather in Oslo?" in text
    assert stats.system_folded == 1


def test_template_that_drops_a_turn_fails_naming_the_row(tmp_path):
    tok = load_tokenizer("llama3").__class__.from_pretrained(load_tokenizer("llama3").name_or_path)
    # keeps only the last two messages: earlier turns vanish from the training text
    tok.chat_template = ("{% for m in messages[-2:] %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
                         "{{ m.content }}<|eot_id|>{% endfor %}")
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    bad = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
           {"role": "user", "content": "second"}, {"role": "assistant", "content": "again"}]
    path = _write(tmp_path / "m.json", [{"messages": good}, {"messages": bad}])
    with pytest.raises(QloraError, match=r"m\.json: row 1: field 'messages' turn 0 \(user\): the tokenizer's "
                                         r"chat template drops its text"):
        build_datasets(path, tok)


def test_text_the_template_adds_only_on_the_last_turn_is_not_trained(tmp_path):
    """A Qwen3-like template: an empty think block before the *last* answer only, and a
    newline after its end-of-turn token. Every answer must train the same way."""
    tok = load_tokenizer("llama3").__class__.from_pretrained(load_tokenizer("llama3").name_or_path)
    tok.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
        "{{ m.content }}<|eot_id|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    chat = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "second answer"}]
    train, _, _ = build_datasets(_write(tmp_path / "m.json", [{"messages": chat}]), tok)
    ex = train[0]
    assert "<think>" in decode(tok, ex["input_ids"])  # the template's text stays in the input ...
    runs = [decode(tok, r) for r in label_runs(ex["input_ids"], ex["labels"])]
    assert runs == ["first answer<|eot_id|>", "second answer<|eot_id|>"]  # ... but is not trained


def test_mixed_formats_are_detected_per_row(tmp_path):
    tok = load_tokenizer("llama3")
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(12)]
    alpaca = [{"instruction": f"do {i}", "output": f"done {i}"} for i in range(3)]
    path = _write(tmp_path / "mixed.json", chats[:5] + alpaca + chats[5:])
    # a valid messages row is never blamed; the chosen format and the odd rows are named
    with pytest.raises(QloraError, match=r"mixed\.json: rows mix data formats: 12 of 15 rows are messages, "
                                         r"3 are alpaca \(rows 5, 6, 7\)"):
        build_datasets(path, tok)
    train, _, stats = build_datasets(path, tok, skip_malformed=True)
    assert len(train) == 12 and stats.skipped_malformed == 3
    (line,) = stats.report(path)
    assert line.startswith(f"{path}: skipped 3 malformed row(s) of 15") and "row 5: field 'messages' is missing" in line


def test_skipped_rows_are_reported_with_their_reasons(tmp_path):
    tok = load_tokenizer("llama3")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    rows = [good] * 3 + [{"messages": [{"role": "robot", "content": "x"}]}] + [good] * 36 \
        + [{"messages": [{"role": "user", "content": None}]}]
    path = _write(tmp_path / "m.json", rows)
    _, _, stats = build_datasets(path, tok, skip_malformed=True)
    assert stats.skipped_malformed == 2
    assert stats.malformed_examples == [
        "row 3: field 'messages[0].role' has unknown role 'robot' (expected one of: system, user, assistant, tool)",
        "row 40: field 'messages[0].content' is missing"]


def test_all_empty_texts_stop_instead_of_training(tmp_path):
    tok = load_tokenizer("llama3")
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "   ", "\n"]))
    with pytest.raises(QloraError, match=r"t\.jsonl: no usable examples \(3 rows: 0 malformed, 3 with nothing to train on\)"):
        build_datasets(str(path), tok)
    # one real text among blanks trains that one
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "Once upon a time.", " "]))
    train, _, stats = build_datasets(str(path), tok)
    assert len(train) == 1 and stats.dropped_no_target == 2
