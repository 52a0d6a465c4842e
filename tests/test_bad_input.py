"""Bad input to `qlora train` fails with one line naming the file, field or row, before any
weight is read, and leaves an existing run as it was (issue #14)."""

from __future__ import annotations

import json
from pathlib import Path

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


# --------------------------------------------------------------------------- every command


@pytest.fixture(scope="module")
def bad(trained_run, tmp_path_factory):
    """Malformed inputs next to a real run, plus outputs that must survive every failure."""
    import shutil
    d = tmp_path_factory.mktemp("bad")
    (d / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (d / "broken.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    (d / "a_file").write_text("not a folder")
    (d / "bad.yaml").write_text("model: [unclosed\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    for name, keep in (("truncated", 0.5), ("empty_weights", 0.0)):
        shutil.copytree(trained_run / "adapter", d / name)
        w = d / name / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[: int(w.stat().st_size * keep)])
    shutil.copytree(trained_run / "adapter", d / "bad_config")
    (d / "bad_config" / "adapter_config.json").write_text("{not json")
    shutil.copytree(trained_run / "adapter", d / "garbage_header")
    w = d / "garbage_header" / "adapter_model.safetensors"
    w.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    base = asset("models/stories260K")
    shutil.copytree(base, d / "base_truncated")
    w = d / "base_truncated" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])
    shutil.copytree(trained_run / "adapter", d / "on_truncated_base")
    cfg = json.loads((d / "on_truncated_base" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(d / "base_truncated")
    (d / "on_truncated_base" / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "existing").mkdir()
    (d / "existing" / "model.safetensors").write_bytes(b"an earlier export")
    return d


def recipe_args(d: Path, run: Path, **sections) -> list[str]:
    """`train RECIPE` for a fresh recipe file with `sections` merged in."""
    r = {"model": {"name_or_path": str(asset("models/stories260K"))},
         "data": {"path": str(asset("data/c4_text_300.jsonl")), "max_seq_len": 64},
         "train": {"output_dir": str(d / "new_run"), "max_steps": 1, "batch_size": 1}}
    for section, values in sections.items():
        r.setdefault(section, {}).update(values) if isinstance(values, dict) else r.update({section: values})
    path = d / f"recipe-{abs(hash(json.dumps(sections, sort_keys=True, default=str)))}.yaml"
    path.write_text(yaml.safe_dump(r))
    return ["train", str(path)]


# (id, argv from (bad folder, run), what the one line must contain)
COMMAND_CASES = [
    # train: the recipe itself
    ("train recipe missing", lambda d, r: ["train", str(d / "nope.yaml")], "nope.yaml"),
    ("train recipe not YAML", lambda d, r: ["train", str(d / "bad.yaml")], "bad.yaml"),
    ("train recipe not a mapping", lambda d, r: ["train", str(d / "list.yaml")], "list.yaml"),
    ("train unknown section", lambda d, r: recipe_args(d, r, trian={"max_steps": 1}), "trian"),
    ("train unknown key", lambda d, r: recipe_args(d, r, train={"max_step": 3}), "max_steps"),
    ("train wrong type", lambda d, r: recipe_args(d, r, train={"max_steps": "many"}), "train.max_steps"),
    ("train negative lr", lambda d, r: recipe_args(d, r, train={"lr": -1.0}), "train.lr"),
    ("train rank zero", lambda d, r: recipe_args(d, r, lora={"r": 0}), "lora.r"),
    ("train quantization", lambda d, r: recipe_args(d, r, model={"quantization": "int3"}), "model.quantization"),
    ("train compute dtype", lambda d, r: recipe_args(d, r, model={"compute_dtype": "float8"}), "model.compute_dtype"),
    ("train --set without =", lambda d, r: recipe_args(d, r) + ["--set", "train.max_steps"], "train.max_steps"),
    ("train --set unknown key", lambda d, r: recipe_args(d, r) + ["--set", "lora.rank=4"], "lora.rank"),
    ("train recipe and --resume", lambda d, r: recipe_args(d, r) + ["--resume", str(r)], "not both"),
    ("train --resume not a run", lambda d, r: ["train", "--resume", str(d)], "not a run directory"),
    # train: the files it names
    ("train data missing", lambda d, r: recipe_args(d, r, data={"path": str(d / "none.jsonl")}), "data.path"),
    ("train eval data missing", lambda d, r: recipe_args(d, r, data={"eval_path": str(d / "none.jsonl")}),
     "data.eval_path"),
    ("train data not JSON", lambda d, r: recipe_args(d, r, data={"path": str(d / "broken.jsonl")}),
     "broken.jsonl: line 2 is not valid JSON"),
    ("train data empty", lambda d, r: recipe_args(d, r, data={"path": str(d / "empty.jsonl")}), "empty.jsonl"),
    ("train data blank", lambda d, r: recipe_args(d, r, data={"path": str(d / "blank.jsonl")}), "blank.jsonl"),
    ("train model missing", lambda d, r: recipe_args(d, r, model={"name_or_path": str(d / "no_model")}),
     "model.name_or_path"),
    ("train output_dir a file", lambda d, r: recipe_args(d, r, train={"output_dir": str(d / "a_file")}), "a_file"),
    ("train output_dir under a file", lambda d, r: recipe_args(d, r, train={"output_dir": str(d / "a_file" / "run")}),
     "a_file"),
    ("train existing run", lambda d, r: recipe_args(d, r, train={"output_dir": str(r)}), "--resume"),
    ("train base truncated", lambda d, r: recipe_args(d, r, model={"name_or_path": str(d / "base_truncated")}),
     "base_truncated"),
    # export
    ("export source missing", lambda d, r: ["export", str(d / "nothing"), "--out", str(d / "o")], "nothing"),
    ("export adapter truncated", lambda d, r: ["export", str(d / "truncated"), "--out", str(d / "o")],
     "truncated"),
    ("export adapter empty", lambda d, r: ["export", str(d / "empty_weights"), "--out", str(d / "o")],
     "empty_weights"),
    ("export adapter header", lambda d, r: ["export", str(d / "garbage_header"), "--out", str(d / "o")],
     "garbage_header"),
    ("export adapter config", lambda d, r: ["export", str(d / "bad_config"), "--out", str(d / "o")],
     "adapter_config.json"),
    ("export base truncated", lambda d, r: ["export", str(d / "on_truncated_base"), "--out", str(d / "o")],
     "base_truncated"),
    ("export out not empty", lambda d, r: ["export", str(r), "--out", str(d / "existing")], "--force"),
    ("export out a file", lambda d, r: ["export", str(r), "--out", str(d / "a_file")], "a_file"),
    ("export shard size", lambda d, r: ["export", str(r), "--out", str(d / "o"), "--max-shard-size", "lots"],
     "max_shard_size"),
    ("export device", lambda d, r: ["export", str(r), "--out", str(d / "o"), "--device", "tpu"], "device"),
    ("export gguf out a folder", lambda d, r: ["export", str(r), "--format", "gguf", "--out", str(d / "existing")],
     "existing"),
    # generate
    ("generate negative tokens", lambda d, r: ["generate", str(r), "--prompt", "hi", "--max-new-tokens", "-5"],
     "--max-new-tokens"),
    ("generate negative temperature", lambda d, r: ["generate", str(r), "--prompt", "hi", "--temperature", "-1"],
     "--temperature"),
    ("generate top_p", lambda d, r: ["generate", str(r), "--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    ("generate model missing", lambda d, r: ["generate", str(d / "nothing"), "--prompt", "hi"], "nothing"),
    ("generate adapter truncated", lambda d, r: ["generate", str(d / "truncated"), "--prompt", "hi"], "truncated"),
    ("generate device", lambda d, r: ["generate", str(r), "--prompt", "hi", "--device", "cuda:7"], "cuda:7"),
    # eval
    ("eval data missing", lambda d, r: ["eval", str(r), "--data", str(d / "none.jsonl")], "none.jsonl"),
    ("eval data not UTF-8", lambda d, r: ["eval", str(r), "--data", str(d / "latin1.jsonl")], "latin1.jsonl"),
    ("eval adapter truncated", lambda d, r: ["eval", str(d / "truncated"), "--data", str(d / "blank.jsonl")],
     "truncated"),
    ("eval batch size", lambda d, r: ["eval", str(r), "--data", str(d / "blank.jsonl"), "--batch-size", "0"],
     "--batch-size"),
    ("eval max seq len", lambda d, r: ["eval", str(r), "--data", str(d / "blank.jsonl"), "--max-seq-len", "-1"],
     "--max-seq-len"),
    ("eval format", lambda d, r: ["eval", str(r), "--data", str(d / "blank.jsonl"), "--format", "yaml"], "yaml"),
    # plan, inspect
    ("plan device", lambda d, r: ["plan", str(r / "recipe.yaml"), "--device", "gpu:big"], "gpu:big"),
    ("inspect adapter truncated", lambda d, r: ["inspect", str(d / "truncated")], "truncated"),
    ("inspect out a file", lambda d, r: ["inspect", str(r), str(r), "--out", str(d / "a_file")], "a_file"),
]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name,argv,fragment", COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_every_command_fails_with_one_line_and_touches_nothing(bad, trained_run, capsys, name, argv, fragment):
    args = argv(bad, trained_run)
    before = _tree(bad), _tree(trained_run)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qlora: error: "), err
    assert fragment in err, err
    assert (_tree(bad), _tree(trained_run)) == before


def test_under_accelerate_launch_every_process_stops_with_the_one_line(bad, tmp_path):
    """2 processes (gloo on CPU): the main process reads the data first; its error used to
    leave the other process to die at the barrier with ~80 lines of traceback. Now each
    process prints the line; what follows is accelerate's launcher reporting the exit code."""
    import os
    import subprocess
    import sys
    entry = tmp_path / "entry.py"
    entry.write_text("import sys\nfrom qlora.cli import main\nsys.exit(main())\n")
    args = recipe_args(bad, tmp_path, data={"path": str(bad / "broken.jsonl")},
                       train={"output_dir": str(tmp_path / "run")})
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(entry), *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("qlora: error: ")]
    assert len(ours) == 2 and len(set(ours)) == 1 and "broken.jsonl: line 2 is not valid JSON" in ours[0]
    assert "[rank" not in proc.stderr and "qlora/" not in proc.stderr  # no traceback from our code
    assert not (tmp_path / "run").exists()
