"""One answer to "what is this folder" for export, generate, eval and the trainer: base,
adapter, quantization settings, tokenizer, and how prompts are rendered.

References: `load_model` + `load_adapter` called with the settings spelled out, and the
training data pipeline's own tokenization (a prompt must be exactly the tokens training put
before an answer).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import qlora.generate as generate_mod
from qlora.adapter import load_adapter, save_adapter
from qlora.cli import main
from qlora.config import LoraConfig, load_recipe, save_resolved
from qlora.data import IGNORE_INDEX, build_datasets
from qlora.errors import QloraError
from qlora.evaluate import evaluate_model
from qlora.generate import encode_prompt, load_for_generation
from qlora.hub import looks_like_hub_id
from qlora.lora import add_lora
from qlora.model import load_model, load_tokenizer
from qlora.quant import QuantLinear
from qlora.resolve import resolve

from conftest import ASSETS, asset


pytestmark = pytest.mark.usefixtures("one_thread")


def copy_run(run: Path, out: Path, *, final: bool = True, **model_settings) -> Path:
    """A copy of `run`, without its final adapter unless `final`, its recipe's model section
    changed by `model_settings`."""
    shutil.copytree(run, out, ignore=None if final else shutil.ignore_patterns("adapter"))
    recipe = load_recipe(out / "recipe.yaml")
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **model_settings))
    save_resolved(dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, output_dir=str(out))),
                  out / "recipe.yaml")
    return out


# --------------------------------------------------------------------------- the resolver


def test_every_kind_of_folder_resolves(trained_run, tmp_path):
    stories = asset("models/stories260K")
    run = resolve(trained_run)
    assert (run.kind, run.adapter, run.final, run.model, run.model_id) == (
        "run", trained_run / "adapter", True, stories, str(stories))
    assert (run.quant.quantization, run.quant.double_quant, run.quant.compute_dtype) == ("nf4", True, torch.bfloat16)
    assert (run.settings_from, run.data_format, run.tokenizer) == ("recipe", "alpaca", str(stories))

    ckpt = resolve(trained_run / "checkpoint-000004")
    assert (ckpt.kind, ckpt.adapter, ckpt.settings_from, ckpt.data_format) == (
        "checkpoint", trained_run / "checkpoint-000004", "recipe", "alpaca")
    assert resolve(trained_run / "adapter").settings_from == "recipe"

    bare = tmp_path / "bare-adapter"
    shutil.copytree(trained_run / "adapter", bare)
    lone = resolve(bare)
    assert (lone.kind, lone.model, lone.settings_from, lone.data_format) == ("adapter", stories, "default", None)
    holder = tmp_path / "holder"
    shutil.copytree(trained_run / "adapter", holder / "adapter")
    assert resolve(holder).adapter == holder / "adapter"
    forced = resolve(bare, quantization="fp4", double_quant=False, compute_dtype="float16")
    assert (forced.quant.quantization, forced.quant.double_quant, forced.quant.compute_dtype,
            forced.settings_from) == ("fp4", False, torch.float16, "arguments")
    assert resolve(bare, compute_dtype="float16").settings_from == "default+arguments"

    killed = resolve(copy_run(trained_run, tmp_path / "killed", final=False))
    assert (killed.kind, killed.final, killed.adapter.name) == ("run", False, "checkpoint-000008")

    model = resolve(stories)
    assert (model.kind, model.adapter, model.quant, model.data_format) == ("model", None, None, None)

    # a run saved before recipes recorded the detected format: detected again from the data
    old = copy_run(trained_run, tmp_path / "old-run")
    text = (old / "recipe.yaml").read_text()
    (old / "recipe.yaml").write_text(text.replace("format: alpaca", "format: auto"))
    assert resolve(old).data_format == "alpaca"

    with pytest.raises(QloraError, match="not a run, checkpoint, adapter or model folder"):
        resolve(tmp_path)
    with pytest.raises(QloraError, match="quantization: expected nf4, fp4 or none, got 'int8'"):
        resolve(bare, quantization="int8")
    with pytest.raises(QloraError, match="compute_dtype: expected one of"):
        resolve(bare, compute_dtype="float64")
    with pytest.raises(QloraError, match="--base does not apply"):
        resolve(stories, base=stories)


def test_hub_id_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("meta-llama/Llama-2-7b-hf", "huggyllama/llama-7b", "gpt2", "HuggingFaceTB/SmolLM2-135M"):
        assert looks_like_hub_id(name), name
    for name in ("/abs/model", "./model", "~/model", "a/b/c", "data.json", "owner/data.jsonl",
                 "owner/../x", "models/missing", ""):  # models/ exists here: a local path with a typo
        assert not looks_like_hub_id(name), name


def test_adapters_record_the_hub_id_not_the_cache_path(tmp_path, monkeypatch):
    """A base that came from the hub is recorded by its id: the snapshot path in this
    machine's cache means nothing to another machine, nor to PEFT."""
    import huggingface_hub
    snapshot = tmp_path / "hub" / "models--someone--stories" / "snapshots" / "0123abcd"
    shutil.copytree(asset("models/stories260K"), snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(snapshot))
    model = load_model("someone/stories", device="cpu")
    add_lora(model, LoraConfig(r=4, alpha=8))
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "someone/stories"
    src = resolve(tmp_path / "adapter")
    assert (src.model, src.model_id) == (snapshot, "someone/stories")


# --------------------------------------------------------------------------- generate and eval


def test_generate_and_eval_on_a_run_honour_double_quant_and_compute_dtype(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run", double_quant=False, compute_dtype="float16")
    stories = asset("models/stories260K")
    model, tok = load_for_generation(run, device="cpu")
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 35
    assert all(m.compute_dtype == torch.float16 and not m.weight.quant_state.nested for m in quantized)
    want = load_adapter(load_model(stories, double_quant=False, compute_dtype="float16", device="cpu"),
                        run / "adapter").eval()
    default = load_adapter(load_model(stories, device="cpu"), run / "adapter").eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
        assert torch.equal(got, want(ids).logits)
        assert not torch.equal(got.float(), default(ids).logits.float())  # the settings matter

    data = tmp_path / "eval.json"
    data.write_text(json.dumps(json.loads(asset("data/alpaca_5000.json").read_text())[100:120]))
    assert main(["eval", str(run), "--data", str(data), "--max-seq-len", "64", "--device", "cpu"]) == 0
    loss = evaluate_model(want, load_tokenizer(stories), data, max_seq_len=64)["loss"]
    assert f"loss {loss:.4f}" in capsys.readouterr().out


def test_a_run_without_its_final_adapter_uses_the_latest_checkpoint(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "killed", final=False)
    assert main(["generate", str(run), "--prompt", "Name a color.", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert "checkpoint-000008" in out.err and out.out.strip()
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(json.loads(asset("data/alpaca_5000.json").read_text())[:8]))
    assert main(["eval", str(run), "--data", str(data), "--max-seq-len", "64"]) == 0
    assert "checkpoint-000008" in capsys.readouterr().err
    # shipping a model is not done from a guess: export wants the checkpoint named
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "export a checkpoint instead, e.g." in capsys.readouterr().err


def test_device_option(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert "verified layer by layer" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "out"), "--prompt", "Hi", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["generate", str(trained_run), "--prompt", "Hi", "--device", "tpu"]) == 2
    assert "device: expected cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["eval", str(trained_run), "--data", "x.json", "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert "device: cuda is not available on this machine" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- prompts as trained


def _training_prompt(tok, path: Path, fmt: str) -> list[int]:
    """The tokens training put before the answer of the one row in `path` (label -100)."""
    train, _, _ = build_datasets(str(path), tok, format=fmt, max_seq_len=4096)
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:first]


CASES = [  # (tokenizer, format, row, the prompt a user types, style)
    ("models/stories260K", "alpaca", {"instruction": "Name a color.", "input": "", "output": "Blue."},
     "Name a color.", "alpaca"),
    ("models/stories260K", "guanaco", {"input": "### Human: Name a color.### Assistant:", "output": "Blue."},
     "Name a color.", "chat"),  # no chat template: training's default Guanaco-style rendering
    ("tokenizers/llama-3.1-instruct", "messages", {"messages": [
        {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]},
     "Name a color.", "chat"),
    ("tokenizers/mistral-7b-v0.3-instruct", "messages", {"messages": [
        {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]},
     "Name a color.", "chat"),
    ("models/stories260K", "prompt_completion", {"prompt": "Once upon a time", "completion": " there was"},
     "Once upon a time", "raw"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0].split('/')[-1]}-{c[1]}" for c in CASES])
def test_prompts_are_the_tokens_training_put_before_an_answer(tmp_path, case):
    tok_path, fmt, row, prompt, style = case
    tok = load_tokenizer(asset(tok_path))
    path = tmp_path / "row.json"
    path.write_text(json.dumps([row]))
    assert generate_mod.prompt_style(fmt, tok) == style
    assert encode_prompt(tok, prompt, style)[0].tolist() == _training_prompt(tok, path, fmt)


def test_generate_renders_as_the_run_was_trained_unless_told(trained_run, tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(generate_mod, "generate", lambda model, tok, prompt, **kw: seen.append(kw["style"]) or "")
    for flags, style in (([], "alpaca"), (["--raw"], "raw"), (["--chat"], "chat")):
        assert main(["generate", str(trained_run), "--prompt", "Name a color.", *flags]) == 0
        assert seen[-1] == style
    with pytest.raises(SystemExit):
        main(["generate", str(trained_run), "--prompt", "x", "--raw", "--chat"])
    capsys.readouterr()
    # an export keeps the run's data format: prompted like the run
    assert main(["export", str(trained_run), "--out", str(tmp_path / "merged"), "--no-verify"]) == 0
    assert main(["generate", str(tmp_path / "merged"), "--prompt", "Name a color."]) == 0
    assert seen[-1] == "alpaca"
    # a model nobody trained here: the chat template when its tokenizer has one, else raw
    assert main(["generate", str(asset("models/stories260K")), "--prompt", "Once"]) == 0
    assert seen[-1] == "raw"


def test_sample_prompts_are_rendered_like_the_training_data(tmp_path, monkeypatch):
    import qlora.train as train_mod
    from qlora.config import DataConfig, ModelConfig, Recipe, TrainConfig
    seen = []
    real = train_mod.generate
    monkeypatch.setattr(train_mod, "generate", lambda *a, **kw: seen.append(kw["style"]) or real(*a, **kw))
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(json.loads(asset("data/alpaca_5000.json").read_text())[:24]))
    recipe = Recipe(model=ModelConfig(name_or_path=str(asset("models/stories260K"))),
                    lora=LoraConfig(r=4, alpha=8), data=DataConfig(path=str(data), max_seq_len=64, eval_ratio=0.2),
                    train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=4, grad_accum=1,
                                      optimizer="adamw_torch", eval_steps=1, sample_prompts=["Name a color."],
                                      sample_max_new_tokens=2))
    assert recipe.data.format == "auto"
    train_mod.train(recipe)
    assert seen and set(seen) == {"alpaca"}
    assert load_recipe(tmp_path / "run" / "recipe.yaml").data.format == "alpaca"  # what 'auto' found
