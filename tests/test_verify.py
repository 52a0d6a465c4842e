"""Layer-streamed verification of an export against the adapter on its 4-bit base.

The adapter is a real trained one (the `trained_run` fixture: 8 steps of the real trainer on
stories260K and Alpaca rows), whose effect on the logits is a trained adapter's: small next to
the logits' scale. References: the adapter on its 4-bit base as `load_model` + `load_adapter`
build it, and plain fp32 math.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora.export as export_mod
from qlora.errors import QloraError
from qlora.export import export
from qlora.resolve import resolve
from qlora.safetensors_io import TensorReader, checkpoint_files, iter_tensors
from qlora.verify import VERIFY_RTOL, verify_export, verify_folder

from conftest import asset


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    """The trained run exported in fp16 and bf16, verified (the defaults)."""
    tmp = tmp_path_factory.mktemp("exports")
    return {dtype: (tmp / dtype, export(trained_run, tmp / dtype, dtype=dtype)) for dtype in ("fp16", "bf16")}


def test_correct_exports_pass_far_inside_the_tolerance(exports):
    for dtype, (out, report) in exports.items():
        assert report["verified"] and report["tolerance"] == VERIFY_RTOL
        assert len(report["layer_errors"]) == len(report["layer_scale_errors"]) == 5
        # the adapter changes the logits, but by little next to their scale
        assert 0 < report["adapter_logit_change"] < 0.5 * report["max_abs_logit"]
        # fp16 keeps the merged weights to 11 bits: errors are a small fraction of the change
        bound = 0.02 if dtype == "fp16" else VERIFY_RTOL
        assert report["relative_error"] < bound, (dtype, report["relative_error"])
        assert max(map(abs, [report["scale_error"], *report["layer_scale_errors"]])) < bound / 2
        assert (report["fp16_max_activation"] is not None) == (dtype == "fp16")
        info = json.loads((out / "qlora_export.json").read_text())
        assert info["verification"]["relative_error"] == report["relative_error"]
        assert info["data_format"] == "alpaca"  # what the run was trained on
    assert exports["fp16"][1]["fp16_max_activation"] < 65504


def _no_delta(monkeypatch):
    monkeypatch.setattr(export_mod, "merged_weight", lambda w, a, b, s, dtype: w.to(dtype))


def _scaled(monkeypatch):
    real = export_mod.merged_weight
    monkeypatch.setattr(export_mod, "merged_weight", lambda w, a, b, s, dtype: real(w, a, b, 1.1 * s, dtype))


def _one_module_unmerged(monkeypatch):
    """The delta of a single module (layer 3's up_proj, 1 of 35) left out."""
    real = export_mod.Merger.__call__

    def call(self, name, w):
        if name == "model.layers.3.mlp.up_proj.weight":
            return real(dataclasses.replace(self, deltas={}), name, w)
        return real(self, name, w)
    monkeypatch.setattr(export_mod.Merger, "__call__", call)


WRONG_MERGES = {"no delta": _no_delta, "scaling off by 10%": _scaled, "one module's delta missing": _one_module_unmerged}


@pytest.mark.parametrize("bug", sorted(WRONG_MERGES))
def test_a_wrong_merge_fails_and_publishes_nothing(trained_run, tmp_path, monkeypatch, bug):
    WRONG_MERGES[bug](monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(QloraError, match=r"verification failed at (logits|model\.layers\.\d): .*carries"):
        export(trained_run, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_export_of_another_base_fails(trained_run, exports, tmp_path):
    """The adapter merged into a sibling of its base (every weight moved by 1% noise: a
    different fine-tune of the same model, say) is not the model training optimized."""
    stories = asset("models/stories260K")
    other = tmp_path / "other-base"
    shutil.copytree(stories, other)
    g = torch.Generator().manual_seed(0)
    tensors = {n: t + 0.01 * t.abs().mean() * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
               for n, t in iter_tensors(checkpoint_files(stories))}
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    export(trained_run, tmp_path / "merged-other", base=other, verify=False)
    src = resolve(trained_run)
    with pytest.raises(QloraError, match="verification failed"):
        verify_folder(src, tmp_path / "merged-other", torch.float16)
    # the same check passes the real export: the verifier, not the data, makes the difference
    assert verify_folder(src, exports["fp16"][0], torch.float16)["relative_error"] < 0.02


def test_verification_streams_layer_by_layer_from_any_reader(trained_run, exports):
    """The exported weights come from a function (name -> tensor), read one decoder layer
    after the other, each tensor once: what keeps the peak at one layer (the RSS figures are
    in benchmarks/export_scale.py)."""
    folder, report = exports["fp16"]
    reader, order = TensorReader(checkpoint_files(folder)), []

    def exported(name):
        order.append(name)
        return reader(name)

    again = verify_export(resolve(trained_run), exported, torch.float16)
    assert again["relative_error"] == report["relative_error"]
    layers = [int(m.group(1)) for n in order if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    assert layers == sorted(layers) and set(layers) == set(range(5))
    in_layers = [n for n in order if n.startswith("model.layers.")]
    assert sorted(in_layers) == sorted(n for n in reader.names() if n.startswith("model.layers."))
    assert len(in_layers) == len(set(in_layers))


def test_fp16_activation_overflow_is_caught_and_named(trained_run, tmp_path):
    """Weights that fit in fp16 (|w| ~ 4000) but an activation that does not: fp16 fails
    naming where, and points to bf16; bf16 exports and verifies."""
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.2.mlp.up_proj.lora_{}.weight"
    state[key.format("A")] = torch.full_like(state[key.format("A")], 0.5)
    state[key.format("B")] = torch.full_like(state[key.format("B")], 500.0)  # delta 2 * 8 * 0.5 * 500
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QloraError, match=r"^model\.layers\.2(\.[\w.]+)?: activations overflow float16 "
                                         r".*--dtype bf16"):
        export(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = export(adapter, tmp_path / "out", dtype="bf16")
    assert report["verified"] and report["fp16_max_activation"] is None
    up = load_file(str(tmp_path / "out" / "model.safetensors"))["model.layers.2.mlp.up_proj.weight"]
    assert 3000 < up.float().abs().max() < 65504  # the weights themselves would have fit


def test_merge_into_original_is_reported_not_enforced(trained_run, exports, tmp_path):
    report = export(trained_run, tmp_path / "orig", merge_into="original")
    assert not report["verified"] and report["tolerance"] is None
    # merging into the unquantized weights moves the model by the quantization error,
    # far more than the adapter's own change: reported, so the user sees it
    assert report["relative_error"] > 10 * exports["fp16"][1]["relative_error"]


@pytest.mark.slow
def test_verification_at_7b_layer_width(tmp_path):
    """One decoder layer of Llama-2-7B's shape (hidden 4096, FFN 11008, 32 heads) with a weak
    adapter (its delta ~1% of the weights): the fp16 export passes; the delta missing or
    scaled by 1.1 fails. Thresholds that hold at width 64 must hold at real widths."""
    from transformers import LlamaConfig
    from qlora.adapter import PREFIX, peft_config
    from qlora.config import LoraConfig
    base = tmp_path / "base"
    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    config.save_pretrained(base)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (1024, 4096), "lm_head.weight": (1024, 4096)}
    linears = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
               "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
               "mlp.down_proj": (4096, 11008)}
    tensors = {n: (torch.randn(s, generator=g) * 0.02).bfloat16() for n, s in shapes.items()}
    tensors.update({f"model.layers.0.{n}.weight": (torch.randn(s, generator=g) * 0.02).bfloat16()
                    for n, s in linears.items()})
    for n in ("model.norm.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.0.post_attention_layernorm.weight"):
        tensors[n] = torch.ones(4096, dtype=torch.bfloat16)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    factors = {}
    for n, (o, i) in linears.items():
        factors[f"{PREFIX}model.layers.0.{n}.lora_A.weight"] = (torch.randn(16, i, generator=g) * 0.02).bfloat16()
        factors[f"{PREFIX}model.layers.0.{n}.lora_B.weight"] = (torch.randn(o, 16, generator=g) * 1e-3).bfloat16()
    save_file(factors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = peft_config(LoraConfig(r=16, alpha=32), sorted(n.rsplit(".", 1)[1] for n in linears), str(base))
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    shutil.copy(asset("models/stories260K") / "tokenizer.json", base)  # any tokenizer will do

    report = export(adapter, tmp_path / "out")
    assert report["verified"] and report["relative_error"] < 0.02 and abs(report["scale_error"]) < 0.01
    real = export_mod.merged_weight
    for bug in (lambda w, a, b, s, d: w.to(d), lambda w, a, b, s, d: real(w, a, b, 1.1 * s, d)):
        export_mod.merged_weight = bug
        try:
            with pytest.raises(QloraError, match="verification failed"):
                export(adapter, tmp_path / "bad")
        finally:
            export_mod.merged_weight = real
