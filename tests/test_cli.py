"""The command line as a user meets it: help text, bad recipes, and a run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora.cli import build_parser, main

from conftest import asset, python_path

REPO = Path(__file__).resolve().parents[1]


def test_every_subcommand_has_complete_help(capsys):
    for cmd in ("train", "export", "generate", "eval", "demo"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--resume", "--set", "lora.r", "train.optimizer", "--merge-into", "--dtype",
                 "--max-shard-size", "--prompt", "--chat", "--raw", "--device", "--data"):
        assert text in out, text
    # every recipe key is documented in `qlora train --help`
    from qlora.config import SECTIONS
    from dataclasses import fields
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f"{section}.{f.name}" in out


@pytest.fixture
def good_recipe(tmp_path) -> dict:
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(asset("data/alpaca_5000.json").read_text())[:40]))
    return {"model": {"name_or_path": str(asset("models/stories260K"))},
            "lora": {"r": 4, "alpha": 8},
            "data": {"path": str(data), "max_seq_len": 64, "eval_ratio": 0.1},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2,
                      "grad_accum": 1, "optimizer": "adamw_torch", "save_steps": 2,
                      "eval_steps": 2, "logging_steps": 1}}


def _write(tmp_path, recipe: dict, name="r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


BAD = [
    ("unknown key", ("lora", "rank", 8), "unknown key 'lora.rank' (did you mean 'lora.r'?)"),
    ("wrong type", ("train", "lr", "fast"), "train.lr: expected float"),
    ("impossible r", ("lora", "r", 0), "lora.r: must be >= 1, got 0"),
    ("negative lr", ("train", "lr", -1e-4), "train.lr"),
    ("zero batch", ("train", "batch_size", 0), "train.batch_size"),
    ("missing data", ("data", "path", "/nonexistent/data.json"), "data.path: path not found: /nonexistent/data.json"),
    ("missing model", ("model", "name_or_path", "/nonexistent/model"), "model.name_or_path: path not found"),
]


@pytest.mark.parametrize("case,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_recipes_fail_with_one_line_and_write_nothing(tmp_path, good_recipe, capsys, case, change, message):
    section, key, value = change
    good_recipe[section][key] = value
    assert main(["train", str(_write(tmp_path, good_recipe))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and str(tmp_path / "r.yaml") in err
    assert not (tmp_path / "run").exists()


def test_finished_run_is_not_overwritten_and_eval_generate_work(tmp_path, good_recipe, capsys):
    recipe = _write(tmp_path, good_recipe)
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert main(["train", str(recipe)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

    assert main(["eval", str(run), "--data", good_recipe["data"]["path"], "--max-seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "40 examples" in out
    assert main(["generate", str(run), "--prompt", "Once upon a time", "--max-new-tokens", "8"]) == 0
    assert len(capsys.readouterr().out.strip()) > 0


def test_user_error_has_no_traceback_in_a_real_process(tmp_path, good_recipe):
    good_recipe["lora"]["alhpa"] = 3
    proc = subprocess.run([sys.executable, "-m", "qlora", "train", str(_write(tmp_path, good_recipe))],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=python_path()),
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("unknown key 'lora.alhpa' (did you mean 'lora.alpha'?)")


def test_every_recipe_loads_against_the_schema():
    from qlora.config import load_recipe
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    names = {p.name for p in recipes}
    assert {"guanaco-7b.yaml", "guanaco-13b.yaml", "guanaco-33b.yaml", "guanaco-65b.yaml",
            "demo.yaml"} <= names
    for path in recipes:
        r = load_recipe(path)
        header = path.read_text().split("\n", 12)
        assert any(f"qlora train recipes/{path.name}" in line for line in header), path
        if path.name.startswith("guanaco"):
            assert (r.lora.r, r.lora.alpha, r.train.max_steps) == (64, 16, 1875)
            assert r.train.batch_size * r.train.grad_accum == 16
            assert r.train.optimizer == "paged_adamw_32bit" and r.train.schedule == "constant"
            big = path.name in ("guanaco-33b.yaml", "guanaco-65b.yaml")
            assert r.lora.dropout == (0.05 if big else 0.1) and r.train.lr == (1e-4 if big else 2e-4)


def test_demo_learns_exports_and_reloads_with_plain_transformers(tmp_path):
    """The README's first command, end to end in its own process: the task must be learnt
    (near 0 -> near 100%) and the merged fp16 export must give the same answers."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "qlora", "demo", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "qlora demo report" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["acc_before"] <= 0.1
    assert report["acc_after"] >= 0.95 and report["acc_merged"] >= 0.95
    assert report["agreement"] >= 0.95
    assert report["loss_after"] < report["loss_before"] / 2
    assert (out / "merged" / "config.json").exists()
    assert (out / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    keep = tmp_path / "mine.txt"
    keep.write_text("precious")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not a demo folder" in capsys.readouterr().err
    assert keep.read_text() == "precious"
