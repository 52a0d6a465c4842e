"""Bad input to `qlora train` fails with one line naming the file, field or row, before any
weight is read, and leaves an existing run as it was (issue #14)."""

from __future__ import annotations

import json

import pytest
import yaml

from qlora.cli import main

from conftest import asset


@pytest.fixture
def recipe(tmp_path):
    r = {"model": {"name_or_path": str(asset("models/stories260K"))},
         "data": {"path": str(asset("data/c4_text_300.jsonl")), "max_seq_len": 64},
         "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 1}}
    return r


def _run(tmp_path, recipe, *sets) -> tuple[int, str]:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return main(["train", str(path), *[a for s in sets for a in ("--set", s)]])


def _bad_files(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "model.json").write_text("{}")
    big = tmp_path / "big_vocab"
    big.mkdir()
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(str(asset("tokenizers/llama-3.1-instruct"))).save_pretrained(str(big))


CASES = [
    ("data not UTF-8", ["data.path={tmp}/latin1.jsonl"],
     "{tmp}/latin1.jsonl: not UTF-8 text (byte 0xe9 at offset 28, line 2)"),
    ("model path is a file", ["model.name_or_path={tmp}/model.json"],
     "{tmp}/model.json: a file; a model is a folder"),
    ("tokenizer larger than the vocabulary", ["model.tokenizer={tmp}/big_vocab"],
     "model.tokenizer: {tmp}/big_vocab has 128256 tokens, more than the model's vocab_size 512"),
    ("absurd packed length", ["data.packing=true", "data.max_seq_len=100000000000"],
     "data.max_seq_len: 100000000000 with data.packing packs rows that long"),
]


@pytest.mark.parametrize("name,sets,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_loading(tmp_path, recipe, capsys, name, sets, message):
    _bad_files(tmp_path)
    # a run that stopped before its first checkpoint: a bad input must not move it aside
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("kept")
    assert _run(tmp_path, recipe, *[s.format(tmp=tmp_path) for s in sets]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qlora: error: ")
    assert message.format(tmp=tmp_path) in err
    assert [p.name for p in tmp_path.glob("run*")] == ["run"] and (run / "recipe.yaml").read_text() == "kept"
