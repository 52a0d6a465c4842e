"""No dead ends after a crash (issue #14): what `qlora train` does with a run folder that a
kill, a crash or a full disk left behind."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from qlora import checkpoint as ckpt
from qlora.cli import main

from conftest import asset


@pytest.fixture
def recipe(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(asset("data/alpaca_5000.json").read_text())[:40]))
    r = {"model": {"name_or_path": str(asset("models/stories260K"))},
         "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
         "data": {"path": str(data), "max_seq_len": 64},
         "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 2,
                   "grad_accum": 1, "optimizer": "adamw_torch", "save_steps": 2,
                   "eval_steps": 1000, "logging_steps": 1, "seed": 3}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _adapter(run):
    from safetensors.torch import load_file
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _crashed_before_first_checkpoint(run, recipe):
    """What a SIGKILL while loading or in step 1 leaves: the recipe and the first log lines."""
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe.read_text())
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "load_seconds": 1.0}) + "\n")


@pytest.mark.parametrize("how", ["again", "resume"])
def test_run_stopped_before_its_first_checkpoint_starts_over(recipe, tmp_path, capsys, how):
    run = tmp_path / "run"
    _crashed_before_first_checkpoint(run, recipe)
    argv = ["train", str(recipe)] if how == "again" else ["train", "--resume", str(run)]
    assert main(argv) == 0
    err = "".join(capsys.readouterr())  # qlora's progress lines go with tqdm's
    assert "stopped before its first checkpoint" in err and "starting it over" in err
    (aside,) = tmp_path.glob("run.stopped-*")  # the old logs are kept, not deleted
    assert (aside / "metrics.jsonl").read_text().startswith('{"step": 0')
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_skips_a_truncated_checkpoint(recipe, tmp_path, capsys):
    assert main(["train", str(recipe), "--set", f"train.output_dir={tmp_path / 'straight'}"]) == 0
    run = tmp_path / "run"
    assert main(["train", str(recipe)]) == 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-000002", "checkpoint-000004"]
    # the newest checkpoint's optimizer state was cut short (a full disk during a copy, say)
    bad = run / "checkpoint-000004" / "optimizer.safetensors"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    import shutil
    shutil.rmtree(run / "adapter")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    err = "".join(capsys.readouterr())
    assert f"checkpoint-000004 is damaged ({bad}: truncated" in err and "resuming from" in err
    assert "checkpoint-000002" in err
    # steps 3 and 4 replayed from checkpoint 2 give the uninterrupted run's adapter
    straight, resumed = _adapter(tmp_path / "straight"), _adapter(run)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_overwrite_replaces_a_run_and_nothing_else(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--set", "train.max_steps=2"]) == 0
    first = _adapter(run)
    assert main(["train", str(recipe)]) == 2
    assert "already holds a run (checkpoint-000002)" in capsys.readouterr().err
    (tmp_path / ".run.removing-999").mkdir()  # what a killed --overwrite leaves
    assert main(["train", str(recipe), "--overwrite", "--set", "lora.r=2"]) == 0
    assert "replacing the run" in "".join(capsys.readouterr())
    assert _adapter(run)[next(iter(first))].shape != next(iter(first.values())).shape
    assert not list(tmp_path.glob(".run.removing-*"))
    assert main(["train", "--resume", str(run), "--overwrite"]) == 2
    assert "either --resume or --overwrite" in capsys.readouterr().err


def test_output_dir_that_is_a_file_fails_before_loading(recipe, tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"qlora: error: train.output_dir: {tmp_path / 'run'} is a file, not a folder"


def test_resume_remembers_its_overrides_and_long_sequences_warn(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--set", "train.max_steps=2", "--set", "data.max_seq_len=600"]) == 0
    out = "".join(capsys.readouterr())
    assert "data.max_seq_len 600 exceeds the model's max_position_embeddings 512" in out
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=3"]) == 0
    # the next resume (or a reader of the run) sees the total the run now has
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 3
    assert [p.name for p in ckpt.list_checkpoints(run)][-1] == "checkpoint-000003"
