"""Several adapters on one loaded 4-bit base (`--adapter NAME=PATH`): switching gives exactly
the model that loading each adapter alone gives, and the base is loaded once."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import qlora.model as model_mod
from qlora.adapter import load_adapter
from qlora.adapter_set import AdapterSet, parse_adapter_flags
from qlora.cli import main
from qlora.config import LoraConfig
from qlora.errors import QloraError
from qlora.lora import add_lora, lora_layers
from qlora.adapter import save_adapter
from qlora.model import load_model

from conftest import asset, write_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def random_adapter(base, out, *, seed, r, targets="all-linear"):
    """An adapter with random non-zero factors (B too: every layer changes the output)."""
    model = load_model(base, device="cpu")
    add_lora(model, LoraConfig(r=r, alpha=2 * r, dropout=0.0, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, out, base_model=str(base))
    return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Realistic per-tensor widths (512 x 1376 MLP) and three adapters of different shapes."""
    d = tmp_path_factory.mktemp("set")
    base = write_tiny_model(d / "base", vocab_size=512, hidden_size=512, intermediate_size=1376,
                            num_attention_heads=8, num_key_value_heads=2, dtype=torch.bfloat16)
    for f in asset("models/stories260K").iterdir():  # its 512-token tokenizer fits this vocabulary
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(f, base / f.name)
    return base, {"a": random_adapter(base, d / "a", seed=1, r=8),
                  "b": random_adapter(base, d / "b", seed=2, r=16, targets=["q_proj", "v_proj"]),
                  "c": random_adapter(base, d / "c", seed=3, r=4)}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_switching_equals_loading_each_adapter_alone(wide, monkeypatch):
    base, paths = wide
    ids = torch.arange(3, 67).view(2, 32)
    alone = {n: logits(load_adapter(load_model(base, device="cpu"), p).eval(), ids) for n, p in paths.items()}
    loads = []
    real = model_mod.load_model
    monkeypatch.setattr(model_mod, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    adapters = AdapterSet.load(paths, device="cpu")
    assert adapters.current == "a" and len(loads) == 1  # the base, once
    for name in ("b", "a", "c", "b", "c", "a"):  # every transition, different ranks and targets
        got = logits(adapters.use(name), ids)
        assert torch.equal(got, alone[name]), name
    assert not torch.equal(alone["a"], alone["b"]) and len(loads) == 1
    with pytest.raises(QloraError, match="no adapter named 'd'"):
        adapters.use("d")


def test_adapters_of_different_bases_or_settings_are_refused(wide, tmp_path, trained_run):
    base, paths = wide
    with pytest.raises(QloraError, match=r"--adapter other: its base .* differs from a's"):
        AdapterSet.load({"a": paths["a"], "other": trained_run}, device="cpu")
    with pytest.raises(QloraError, match=r"--adapter a: trained on .*, not on the MODEL given"):
        AdapterSet.load({"a": paths["a"]}, expect_base=tmp_path, device="cpu")
    for bad, message in ((["a"], "expected NAME=PATH"), (["=x"], "expected NAME=PATH"),
                         (["a=x", "a=y"], "name 'a' given twice")):
        with pytest.raises(QloraError, match=message):
            parse_adapter_flags(bad)


def test_generate_and_eval_take_several_adapters(trained_run, tmp_path, capsys):
    """On the real stories260K run: the run's final adapter and its first checkpoint, by name;
    each answer and loss is the one that adapter gives alone."""
    stories = asset("models/stories260K")
    ckpt = sorted(trained_run.glob("checkpoint-*"))[0]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ["Once upon a time there was a cat.", "The dog ran to the park and played."]))
    flags = ["--adapter", f"final={trained_run}", "--adapter", f"early={ckpt}"]
    assert main(["generate", str(stories), "--prompt", "Once upon a time", "--max-new-tokens", "8",
                 *flags]) == 0
    both = [line for line in capsys.readouterr().out.splitlines() if line]
    assert [line.split(" ", 1)[0] for line in both] == ["[final]", "[early]"]
    for name, target in (("final", trained_run), ("early", ckpt)):
        assert main(["generate", str(target), "--prompt", "Once upon a time", "--max-new-tokens", "8"]) == 0
        alone = capsys.readouterr().out.strip()
        assert f"[{name}] {alone}" in both
    assert main(["eval", "--data", str(data), *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["final", "early"]
    assert main(["eval", str(trained_run), "--data", str(data)]) == 0
    assert lines[0] == "final: " + capsys.readouterr().out.strip()
    assert lines[0] != lines[1].replace("early", "final")
    assert main(["generate", str(trained_run), "--prompt", "x", *flags]) == 2
    assert "with --adapter, MODEL is the base model" in capsys.readouterr().err
