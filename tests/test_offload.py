"""Layer streaming (model.offload) and pre-quantized 4-bit checkpoints (bitsandbytes format,
and the model.cache_dir copy): same numbers as a resident model, loaded from the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qlora import quant
from qlora.errors import QloraError
from qlora.generate import generate
from qlora.config import LoraConfig
from qlora.lora import add_lora
from qlora.checkpointing import enable_gradient_checkpointing
from qlora.model import load_model, load_tokenizer
from qlora.offload import DiskHome
from qlora.prequantized import CACHE_STAMP
from qlora.train import train

from conftest import write_tiny_model
from test_train import adapter, alpaca_slice, losses, make_recipe  # noqa: F401  (fixture)


def codes_and_scales(model) -> dict[str, tuple[torch.Tensor, ...]]:
    return {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone(), quant.dequantize(m))
            for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)}


def lora_grads(model, ids, seed=1, checkpointing=True) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward/backward with dropout; B factors random so every path carries gradient."""
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    torch.manual_seed(seed)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("home,keep", [("disk", 0.0), ("cpu", 0.0), ("disk", 1.0)])
def test_offloaded_training_equals_resident_bitwise(stories, alpaca_slice, tmp_path, home, keep):
    """A few optimizer steps with checkpointing (selective too) and dropout: the same losses
    and the same adapter, bit for bit; the layer file is gone when the run ends."""
    train(make_recipe(stories, alpaca_slice, tmp_path / "resident", keep_matmuls_gb=keep))
    recipe = make_recipe(stories, alpaca_slice, tmp_path / "streamed", keep_matmuls_gb=keep)
    recipe.model.offload, recipe.model.resident_layers = home, 1
    train(recipe)
    assert losses(tmp_path / "resident") == losses(tmp_path / "streamed")
    a, b = adapter(tmp_path / "resident"), adapter(tmp_path / "streamed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "streamed" / "offload").glob("layers-*.bin"))


def test_offloaded_backward_without_checkpointing_attaches_on_demand(stories, tmp_path):
    ids = torch.arange(1, 65).view(2, 32)
    want = lora_grads(load_model(stories, device="cpu"), ids, checkpointing=False)
    model = load_model(stories, device="cpu", offload="disk", offload_dir=tmp_path, resident_layers=0)
    got = lora_grads(model, ids, checkpointing=False)
    assert want[0] == got[0] and all(torch.equal(want[1][k], got[1][k]) for k in want[1])
    # forward streams 0..4; backward without recompute brings each layer back on use
    assert model.qlora_streamer.stats.fetches >= 2 * 5 - 1


def test_the_pre_hook_leaves_a_recompute_to_recompute_context(stories):
    """transformers 5.17 ran module hooks inside the checkpoint's recompute too (5.23 does not); there
    the pre-hook's +1 would fetch layer i+1 again in place of the prefetch of i-1."""
    model = load_model(stories, device="cpu", offload="cpu", resident_layers=0)
    streamer = model.qlora_streamer
    seen = []
    streamer.use = lambda i, step: seen.append((i, step))
    layer = streamer.layers[2]
    hooks = list(layer._forward_pre_hooks.values())
    assert hooks  # load_model attached them
    with quant.checkpoint_phase([], "recompute"):
        for h in hooks:
            h(layer, ())
    assert seen == []
    for h in hooks:
        h(layer, ())
    assert (2, +1) in seen


def test_generation_with_offload_equals_resident(stories, tmp_path):
    tok = load_tokenizer(stories)
    want = generate(load_model(stories, device="cpu"), tok, "Once upon a time", max_new_tokens=12)
    model = load_model(stories, device="cpu", offload="cpu", resident_layers=2)
    assert generate(model, tok, "Once upon a time", max_new_tokens=12) == want
    # a pass over layers 2..4 per token, the next one always prefetched
    assert model.qlora_streamer.stats.fetches >= 12 * 3


def test_generate_and_eval_of_an_offloaded_run_stream_its_base(stories, alpaca_slice, tmp_path):
    """`qlora generate`/`eval` of a run trained with model.offload disk place its base the same
    way (a 65B base that had to stream in training has to stream there too), through the
    run's offload folder, with the resident model's text."""
    from qlora.adapter import load_adapter
    from qlora.generate import load_resolved
    from qlora.resolve import resolve
    recipe = make_recipe(stories, alpaca_slice, tmp_path / "run", max_steps=2)
    recipe.model.offload, recipe.model.resident_layers = "disk", 1
    train(recipe)
    src = resolve(tmp_path / "run")
    assert (src.placement.offload, src.placement.resident_layers) == ("disk", 1)
    model, tok = load_resolved(src, "cpu")
    assert model.qlora_streamer.home.path.parent == tmp_path / "run" / "offload"
    resident = load_adapter(load_model(stories, device="cpu"), src.adapter).eval()
    want = generate(resident, tok, "Once upon a time", max_new_tokens=12)
    assert generate(model, tok, "Once upon a time", max_new_tokens=12) == want
    assert model.qlora_streamer.stats.fetches >= 12 * 4


def test_streamed_layers_hold_no_codes_between_uses(stories, tmp_path):
    model = load_model(stories, device="cpu", offload="disk", offload_dir=tmp_path, resident_layers=2)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        sizes = [m.weight.data.numel() for m in layer.modules() if isinstance(m, quant.QuantLinear)]
        assert all(n > 0 for n in sizes) == (i < 2) and (i < 2 or sum(sizes) == 0)
    path = model.qlora_streamer.home.path
    assert path.stat().st_size >= sum(s.nbytes for i in (2, 3, 4) for s in model.qlora_streamer.slots[i])
    model.qlora_streamer.close()
    assert not path.exists()


def test_stale_layer_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f"layers-{dead}.bin").write_bytes(b"x" * 100)  # left by a SIGKILLed run
    (tmp_path / f"layers-{os.getppid()}.bin").write_bytes(b"y")  # a live process's: kept
    home = DiskHome(tmp_path)
    assert not (tmp_path / f"layers-{dead}.bin").exists()
    assert (tmp_path / f"layers-{os.getppid()}.bin").exists()
    home.close()


def test_offload_settings_are_checked(stories, alpaca_slice, tmp_path):
    from qlora.config import ModelConfig
    with pytest.raises(QloraError, match="model.offload_dir: only used with model.offload"):
        ModelConfig(name_or_path="m", offload_dir="x")
    with pytest.raises(QloraError, match="model.offload: streams 4-bit weights"):
        ModelConfig(name_or_path="m", offload="disk", quantization="none")
    with pytest.raises(QloraError, match="model.resident_layers: must be >= 0"):
        ModelConfig(name_or_path="m", offload="cpu", resident_layers=-1)


# --------------------------------------------------------------------------- pre-quantized


@pytest.fixture(scope="module")
def wide_bf16(tmp_path_factory):
    """A random bf16 Llama with realistic per-tensor widths (512 x 1376 MLP)."""
    return write_tiny_model(tmp_path_factory.mktemp("wide") / "m", vocab_size=512, hidden_size=512,
                            intermediate_size=1376, num_attention_heads=8, num_key_value_heads=2,
                            dtype=torch.bfloat16)


def test_cache_loads_to_exactly_the_weights_quantizing_the_source_gives(wide_bf16, tmp_path, monkeypatch):
    first = load_model(wide_bf16, device="cpu", cache_dir=tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    assert (folder / CACHE_STAMP).is_file() and (folder / "model.safetensors.index.json").is_file()
    monkeypatch.setattr(quant, "quantize_4bit", lambda *a: pytest.fail("quantized again"))
    again = load_model(wide_bf16, device="cpu", cache_dir=tmp_path / "cache")
    want, got = codes_and_scales(first), codes_and_scales(again)
    assert want.keys() == got.keys()
    assert all(torch.equal(x, y) for k in want for x, y in zip(want[k], got[k]))
    ids = torch.arange(1, 65).view(2, 32)
    with torch.no_grad():
        assert torch.equal(first(ids).logits, again(ids).logits)


def test_cache_is_rebuilt_when_stale_or_truncated(wide_bf16, tmp_path):
    cache = tmp_path / "cache"
    load_model(wide_bf16, device="cpu", cache_dir=cache)
    (folder,) = cache.iterdir()
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as f:  # a copy interrupted by a full disk, say
        f.truncate(shard.stat().st_size - 100)
    with pytest.warns(UserWarning, match=r"is damaged \(.*truncated .*; rebuilding"):
        load_model(wide_bf16, device="cpu", cache_dir=cache)
    assert shard.stat().st_size > 0 and (folder / CACHE_STAMP).is_file()
    source = wide_bf16 / "model.safetensors"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # re-saved
    with pytest.warns(UserWarning, match="other versions of the source files; rebuilding"):
        load_model(wide_bf16, device="cpu", cache_dir=cache)
    load_model(wide_bf16, device="cpu", cache_dir=cache, compute_dtype="float16")
    assert len(list(cache.iterdir())) == 2  # other settings: a cache of their own


def test_checkpoint_saved_by_transformers_in_4bit_loads_here(wide_bf16, tmp_path):
    """`save_pretrained` of a transformers + BitsAndBytesConfig model (a `*-bnb-4bit` repo)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(wide_bf16, quantization_config=bnb, dtype=torch.bfloat16,
                                              device_map="cpu")
    hf.save_pretrained(tmp_path / "bnb")
    ours = codes_and_scales(load_model(tmp_path / "bnb", device="cpu"))
    from_source = codes_and_scales(load_model(wide_bf16, device="cpu"))
    assert ours.keys() == from_source.keys()
    assert all(torch.equal(x, y) for k in ours for x, y in zip(ours[k], from_source[k]))
    with pytest.raises(QloraError, match="model.quantization: fp4, but .* pre-quantized as nf4"):
        load_model(tmp_path / "bnb", device="cpu", quantization="fp4")
    with pytest.raises(QloraError, match="model.double_quant: false"):
        load_model(tmp_path / "bnb", device="cpu", double_quant=False)


def test_transformers_loads_our_cache(wide_bf16, tmp_path):
    from transformers import AutoModelForCausalLM
    ours = load_model(wide_bf16, device="cpu", cache_dir=tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    hf = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    mine = codes_and_scales(ours)
    for name, (codes, _, w) in mine.items():
        linear = hf.get_submodule(name)
        assert torch.equal(linear.weight.data, codes)
        assert torch.equal(quant.dequantize(linear).to(w.dtype), w)


def test_prequantized_layers_stream_from_the_checkpoint_in_place(wide_bf16, tmp_path):
    """offload disk on a pre-quantized checkpoint: the layer file stays empty (the streamer
    reads the checkpoint's own bytes), and the gradients are bitwise the resident ones."""
    load_model(wide_bf16, device="cpu", cache_dir=tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    ids = torch.arange(1, 129).view(2, 64)
    want = lora_grads(load_model(folder, device="cpu"), ids)
    model = load_model(folder, device="cpu", offload="disk", offload_dir=tmp_path / "off", resident_layers=0)
    assert model.qlora_streamer.home.path.stat().st_size == 0
    got = lora_grads(model, ids)
    assert want[0] == got[0] and all(torch.equal(want[1][k], got[1][k]) for k in want[1])


def test_incomplete_prequantized_checkpoint_is_one_line(wide_bf16, tmp_path):
    import json
    from safetensors.torch import load_file, save_file
    load_model(wide_bf16, device="cpu", cache_dir=tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    tensors = load_file(str(shard))
    victim = next(k for k in tensors if k.endswith("q_proj.weight.absmax"))
    del tensors[victim]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][victim]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(QloraError, match=r"q_proj has no weight\.absmax tensor"):
        load_model(folder, device="cpu")
