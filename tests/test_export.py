"""Export: merge an adapter into its base and write a plain Hugging Face model, streaming.

References: the 4-bit base exactly as qlora.model.load_model builds it (itself checked against
transformers + bitsandbytes in test_core.py), plain fp32 math for the merge, and
transformers' own loader for the exported folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qlora.export as export_mod
from qlora import quant
from qlora.adapter import load_adapter, save_adapter, read_adapter_config
from qlora.atomic import remove_stale_siblings
from qlora.errors import QloraError
from qlora.export import export, parse_size
from qlora.generate import generate
from qlora.config import LoraConfig
from qlora.lora import add_lora, lora_layers, merged_weight
from qlora.model import load_model, load_tokenizer
from qlora.safetensors_io import checkpoint_files, iter_tensors

from conftest import asset, write_tiny_model, python_path

PROMPTS = ["Once upon a time", "The little dog", "Lily wanted"]


def make_adapter(base, out, *, seed=0, std=0.05, quantization="nf4", compute_dtype="bfloat16",
                 huge_b: str | None = None):
    """A trained-looking adapter: r=8, alpha=16 on all linears, random non-zero A and B."""
    model = load_model(base, quantization=quantization, compute_dtype=compute_dtype, device="cpu")
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            if name == huge_b:
                layer.lora_A.weight.fill_(1.0)
                layer.lora_B.weight.fill_(1e4)  # delta = 2 * 8 * 1e4 = 160000 > fp16 max
    save_adapter(model, out, base_model=str(base))
    return out


def reference(base, adapter, **kw):
    """The adapter on its 4-bit base, as training and `qlora generate` run it."""
    return load_adapter(load_model(base, device="cpu", **kw), adapter).eval()


def fp32_activations(model):
    """Same weight values, fp32 compute: removes bf16 activation rounding from comparisons."""
    for m in model.modules():
        if isinstance(m, quant.Linear4bit):
            m.compute_dtype = torch.float32
    for p in model.parameters():
        if not isinstance(p, quant.Params4bit):
            p.data = p.data.float()
    return model


def original_tensors(base):
    return dict(iter_tensors(checkpoint_files(base)))


def exported_tensors(folder):
    out = {}
    for f in checkpoint_files(folder):
        out.update(load_file(str(f)))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stories_adapter(tmp_path_factory):
    base = asset("models/stories260K")
    return base, make_adapter(base, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def exported(stories_adapter, tmp_path_factory):
    base, adapter = stories_adapter
    out = tmp_path_factory.mktemp("export") / "merged"
    return out, export(adapter, out)  # defaults: fp16, merged into the dequantized base, verified


# --------------------------------------------------------------------------- quantization


def test_nf4_roundtrip_is_bitwise_the_loaded_layer(stories):
    originals = original_tensors(stories)
    for kw in ({}, {"quantization": "fp4", "double_quant": False, "compute_dtype": "float16"}):
        model = load_model(stories, device="cpu", **kw)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, quant.Linear4bit)}
        assert len(layers) == 35
        dtype = {"float16": torch.float16}.get(kw.get("compute_dtype"), torch.bfloat16)
        for name, layer in layers.items():
            got = quant.nf4_roundtrip(originals[name + ".weight"], kw.get("quantization", "nf4"),
                                      kw.get("double_quant", True), dtype)
            want = quant.dequantize(layer)
            assert got.dtype == want.dtype == dtype
            assert torch.equal(got, want), name


# --------------------------------------------------------------------------- the default export


def test_export_writes_a_plain_model_with_bitwise_merged_weights(stories_adapter, exported):
    base, adapter = stories_adapter
    out, report = exported
    assert report["out"] == str(out) and report["dtype"] == "fp16" and report["shards"] == 1
    assert report["tensors_merged"] == 35 and report["tensors_dequantized"] == 35
    assert report["quantization"] == "nf4" and report["quantization_settings_from"] == "default"
    assert report["verified"] and report["relative_error"] <= report["tolerance"] and report["seconds"] > 0
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model", "qlora_export.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".merged.*"))  # no temporary folder left behind

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float16" and "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] is True

    got, orig = exported_tensors(out), original_tensors(base)
    assert got.keys() == orig.keys()  # tied head: not duplicated
    assert "lm_head.weight" not in got
    assert all(t.dtype == torch.float16 for t in got.values())

    ref = reference(base, adapter)
    scaling = read_adapter_config(adapter)[0].scaling
    layers = lora_layers(ref)
    assert len(layers) == 35
    for name, layer in layers.items():
        want = merged_weight(quant.dequantize(layer.base_layer), layer.lora_A.weight,
                             layer.lora_B.weight, scaling, torch.float16)
        assert torch.equal(got[name + ".weight"], want), name
    for name, t in orig.items():  # what training saw: the compute-dtype (bf16) copy
        if name.removesuffix(".weight") not in layers:
            assert torch.equal(got[name], t.to(torch.bfloat16).to(torch.float16)), name

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16 and not any(isinstance(m, quant.Linear4bit) for m in model.modules())


def test_greedy_generations_match_the_adapter(stories_adapter, exported):
    """The merged model generates what the adapter on its 4-bit base generates.

    The adapter runs with fp32 activations (same weight values as in training): with bf16
    activations, the adapter's own text drifts from its fp32 text after a dozen tokens on
    this tiny model (a near-tie flips), which would test bf16 rather than the export.
    """
    base, adapter = stories_adapter
    out, _ = exported
    tok = load_tokenizer(out)  # the copied tokenizer works
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = fp32_activations(reference(base, adapter))
    plain = load_model(base, device="cpu").eval()
    for prompt in PROMPTS:
        want = generate(ref, tok, prompt, max_new_tokens=32)
        assert generate(merged, tok, prompt, max_new_tokens=32) == want, prompt
    # The adapter matters, so the comparison means something.
    assert generate(plain, tok, PROMPTS[0], max_new_tokens=32) != want


# --------------------------------------------------------------------------- options


def test_merge_into_original_differs_by_the_quantization_error(stories_adapter, exported, tmp_path):
    base, adapter = stories_adapter
    deq_dir, deq_report = exported
    report = export(adapter, tmp_path / "orig", merge_into="original")
    assert report["tensors_dequantized"] == 0 and report["tolerance"] is None and not report["verified"]
    assert report["max_logit_diff"] > 5 * deq_report["max_logit_diff"]  # reported, not enforced

    orig, deq, src = exported_tensors(tmp_path / "orig"), exported_tensors(deq_dir), original_tensors(base)
    ref = reference(base, adapter)
    scaling = read_adapter_config(adapter)[0].scaling
    for name, layer in lora_layers(ref).items():
        w = src[name + ".weight"]
        want = merged_weight(w, layer.lora_A.weight, layer.lora_B.weight, scaling, torch.float16)
        assert torch.equal(orig[name + ".weight"], want), name
        quant_error = w - quant.dequantize(layer.base_layer).float()
        diff = orig[name + ".weight"].float() - deq[name + ".weight"].float()
        # Equal up to the two fp16 roundings of the merged values.
        assert (diff - quant_error).abs().max() <= 2 * want.float().abs().max() * 2**-11, name
        assert quant_error.norm() > 0.01 * w.norm()


def test_sharded_export_loads_and_matches_single_file(stories_adapter, exported, tmp_path):
    _, adapter = stories_adapter
    single, _ = exported
    report = export(adapter, tmp_path / "sharded", max_shard_size="100KB", verify=False)
    out = tmp_path / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert report["shards"] == len(shards) > 1
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    tensors = exported_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:
        held = [t for t in load_file(str(out / shard)).values()]
        assert len(held) == 1 or sum(t.numel() * t.element_size() for t in held) <= 100_000
    want = exported_tensors(single)
    assert tensors.keys() == want.keys() and all(torch.equal(tensors[k], want[k]) for k in want)
    a = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    ids = torch.arange(1, 30).view(1, -1)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_untied_bf16_sharded_base_and_bf16_output(tmp_path):
    """A random Llama stored in bf16 across 3 shards, with its own lm_head."""
    base = write_tiny_model(tmp_path / "tiny", shards=3, dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter")
    report = export(adapter, tmp_path / "out", dtype="bf16", max_shard_size="40KB")
    assert report["shards"] > 1 and report["tensors_merged"] == 14 and report["verified"]
    got, src = exported_tensors(tmp_path / "out"), original_tensors(base)
    assert got.keys() == src.keys() and "lm_head.weight" in got
    ref = reference(base, adapter)
    for name, layer in lora_layers(ref).items():
        want = merged_weight(quant.dequantize(layer.base_layer), layer.lora_A.weight,
                             layer.lora_B.weight, 2.0, torch.bfloat16)
        assert torch.equal(got[name + ".weight"], want), name
    assert torch.equal(got["lm_head.weight"], src["lm_head.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_run_and_checkpoint_dirs_use_the_recipe(stories, tmp_path):
    """Quantization settings come from RUN/recipe.yaml (here fp4, fp16 compute)."""
    run = tmp_path / "run"
    kw = dict(quantization="fp4", compute_dtype="float16")
    make_adapter(stories, run / "adapter", **kw)
    make_adapter(stories, run / "checkpoint-000010", seed=1, **kw)
    (run / "recipe.yaml").write_text(
        f"model:\n  name_or_path: {stories}\n  quantization: fp4\n  double_quant: true\n"
        f"  compute_dtype: float16\ndata:\n  path: data.jsonl\ntrain:\n  output_dir: {run}\n")
    for source, out in ((run, tmp_path / "from-run"), (run / "checkpoint-000010", tmp_path / "from-ckpt")):
        report = export(source, out, verify=False)
        assert report["quantization_settings_from"] == "recipe"
        assert (report["quantization"], report["compute_dtype"]) == ("fp4", "float16")
        ref = reference(stories, report["adapter"], **kw)
        got = exported_tensors(out)
        for name, layer in list(lora_layers(ref).items())[:6]:
            want = merged_weight(quant.dequantize(layer.base_layer), layer.lora_A.weight,
                                 layer.lora_B.weight, 2.0, torch.float16)
            assert torch.equal(got[name + ".weight"], want), name
    assert report["adapter"] == str(run / "checkpoint-000010")


# --------------------------------------------------------------------------- refusals


def test_fp16_overflow_names_the_tensor_and_suggests_bf16(stories, tmp_path):
    target = "model.layers.2.mlp.down_proj"
    adapter = make_adapter(stories, tmp_path / "adapter", huge_b=target)
    with pytest.raises(QloraError, match=rf"{target}\.weight: .*float16.*--dtype bf16"):
        export(adapter, tmp_path / "out", verify=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # temp folder cleaned up
    report = export(adapter, tmp_path / "out", dtype="bf16", verify=False)
    assert report["tensors_merged"] == 35


def test_non_empty_output_is_refused_unless_forced(stories_adapter, tmp_path):
    _, adapter = stories_adapter
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QloraError, match=rf"{out}: .*not empty.*--force"):
        export(adapter, out, verify=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    export(adapter, out, force=True, verify=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    export(adapter, empty, verify=False)  # an existing empty folder is fine
    with pytest.raises(QloraError, match="replace its own input"):
        export(adapter, adapter, force=True, verify=False)


def test_failed_verification_publishes_nothing(stories_adapter, tmp_path, monkeypatch):
    _, adapter = stories_adapter
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    # A merge bug: the delta is scaled by 1.1. Verification must catch even this.
    real = export_mod.merged_weight
    monkeypatch.setattr(export_mod, "merged_weight", lambda w, a, b, s, d: real(w, a, b, 1.1 * s, d))
    with pytest.raises(QloraError, match="verification failed"):
        export(adapter, out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the old export untouched
    with pytest.raises(QloraError, match="verification failed"):
        export(adapter, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_bad_sources_and_options(stories_adapter, tmp_path):
    _, adapter = stories_adapter
    with pytest.raises(QloraError, match="not a run, checkpoint, adapter or model folder"):
        export(tmp_path, tmp_path / "out")
    with pytest.raises(QloraError, match="a full model.*nothing to merge"):
        export(asset("models/stories260K"), tmp_path / "out")
    with pytest.raises(QloraError, match=r"dtype: expected one of fp16 \(float16\), bf16 \(bfloat16\), got 'fp32'"):
        export(adapter, tmp_path / "out", dtype="fp32")
    with pytest.raises(QloraError, match="max_shard_size"):
        export(adapter, tmp_path / "out", max_shard_size="lots")
    nobase = tmp_path / "nobase"
    shutil.copytree(adapter, nobase)
    cfg = json.loads((nobase / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = ""
    (nobase / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QloraError, match="base_model_name_or_path is empty"):
        export(nobase, tmp_path / "out")
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "checkpoint-000005")
    (run / "recipe.yaml").write_text(f"model:\n  name_or_path: {asset('models/stories260K')}\n"
                                     f"data:\n  path: d.json\ntrain:\n  output_dir: {run}\n")
    with pytest.raises(QloraError, match="no final adapter.*checkpoint-000005"):
        export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert (parse_size("5GB"), parse_size("200MB"), parse_size("10KB"), parse_size("1GiB")) == \
        (5 * 10**9, 200 * 10**6, 10**4, 2**30)
    assert math.isclose(parse_size(1234), 1234)


def on_base(adapter: Path, base: Path, out: Path) -> Path:
    """A copy of `adapter` that names `base` as its base model."""
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": str(base)}))
    return out


def test_a_prequantized_base_exports_into_its_dequantized_weights(stories_adapter, exported, tmp_path):
    """An adapter on a pre-quantized 4-bit checkpoint (here model.cache_dir's copy): the
    original 16-bit weights do not exist, so export merges into the dequantized ones, which
    are bitwise what exporting from the 16-bit source re-quantizes to: the exports are equal
    bit for bit, safetensors and GGUF alike. merge_into original says why it cannot be."""
    import gguf
    from qlora.gguf_export import export_gguf
    base, adapter = stories_adapter
    load_model(base, device="cpu", cache_dir=tmp_path / "cache")
    (prequantized,) = (tmp_path / "cache").iterdir()
    on_4bit = on_base(adapter, prequantized, tmp_path / "adapter")

    report = export(on_4bit, tmp_path / "out")
    assert report["base_prequantized"] and report["verified"]
    assert report["tensors_dequantized"] == exported[1]["tensors_dequantized"] > 0
    want, got = exported_tensors(exported[0]), exported_tensors(tmp_path / "out")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert json.loads((tmp_path / "out" / "qlora_export.json").read_text())["base_prequantized"]

    export_gguf(adapter, tmp_path / "a.gguf")
    export_gguf(on_4bit, tmp_path / "b.gguf")
    a, b = ({t.name: t.data for t in gguf.GGUFReader(tmp_path / f).tensors} for f in ("a.gguf", "b.gguf"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # tensor order may differ

    for fn, out in ((export, tmp_path / "o2"), (export_gguf, tmp_path / "o2.gguf")):
        with pytest.raises(QloraError, match=r"pre-quantized nf4 checkpoint holds no original 16-bit "
                                             r"weights.*dequantized.*--base"):
            fn(on_4bit, out, merge_into="original")
        assert not out.exists()
    assert export(on_4bit, tmp_path / "o3", base=base, merge_into="original")["verified"] is False


def test_a_bnb_4bit_checkpoint_of_realistic_width_exports_like_its_source(tmp_path):
    """The `*-bnb-4bit` form users download (transformers + BitsAndBytesConfig
    `save_pretrained`), 512 x 1376 MLP weights, no double quantization: a bare adapter takes
    the checkpoint's own 4-bit format, and the export equals the 16-bit source's bitwise."""
    from transformers import BitsAndBytesConfig
    src = write_tiny_model(tmp_path / "m", vocab_size=512, hidden_size=512, intermediate_size=1376,
                           num_attention_heads=8, num_key_value_heads=2, dtype=torch.bfloat16)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.bfloat16,
                                         device_map="cpu").save_pretrained(tmp_path / "bnb")
    adapter = make_adapter(src, tmp_path / "a16")
    on_4bit = on_base(adapter, tmp_path / "bnb", tmp_path / "a4")
    want = export(adapter, tmp_path / "from16", double_quant=False)
    got = export(on_4bit, tmp_path / "from4")
    assert got["double_quant"] is False and got["quantization_settings_from"] == "checkpoint"
    assert got["verified"] and got["tensors_merged"] == want["tensors_merged"] == 14
    a, b = exported_tensors(tmp_path / "from16"), exported_tensors(tmp_path / "from4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(QloraError, match="double_quant: true, but .* was quantized with double_quant false"):
        export(on_4bit, tmp_path / "bad", double_quant=True)


# --------------------------------------------------------------------------- kill safety


KILLED_DURING_VERIFICATION = """
import os, signal, sys
import qlora.export as E
def die(*args, **kwargs):  # every shard is written; verification is where big exports died
    os.kill(os.getpid(), signal.SIGKILL)
E.verify_folder = die
E.export(sys.argv[1], sys.argv[2], force=True)
"""


def test_a_killed_export_leaves_nothing_in_the_way(stories_adapter, exported, tmp_path):
    """SIGKILL after every shard was written: the previous export is untouched, and the next
    export cleans up the killed one's temporary folder and succeeds."""
    _, adapter = stories_adapter
    out = tmp_path / "out"
    shutil.copytree(exported[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.run([sys.executable, "-c", KILLED_DURING_VERIFICATION, str(adapter), str(out)],
                          env=dict(os.environ, PYTHONPATH=python_path()),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".out.tmp-{socket.gethostname()}-")
    assert (leftovers[0] / "model.safetensors").is_file()  # it got that far
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    export(adapter, out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "qlora_export.json").is_file()


def test_stale_siblings_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "merged"
    for name in (f".merged.tmp-{host}-{dead.pid}-0123abcd",    # killed mid-write
                 f".merged.tmp-{host}-{os.getpid()}-0123abcd",  # a write in progress
                 f".merged.tmp-otherhost-{dead.pid}-0123abcd",  # another machine's (shared disk)
                 f".merged.old-{host}-{dead.pid}-0123abcd"):    # killed between the two renames
        (tmp_path / name).mkdir()
    (tmp_path / f".merged.old-{host}-{dead.pid}-0123abcd" / "weights").write_text("previous export")
    done = remove_stale_siblings(out)
    assert len(done) == 2
    # NAME was missing: the folder moved aside is the previous export, put back
    assert (out / "weights").read_text() == "previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["merged", f".merged.tmp-{host}-{os.getpid()}-0123abcd", f".merged.tmp-otherhost-{dead.pid}-0123abcd"])
    (tmp_path / f".merged.old-{host}-{dead.pid}-0123abcd").mkdir()
    remove_stale_siblings(out)  # NAME exists now: a moved-aside folder is garbage
    assert not (tmp_path / f".merged.old-{host}-{dead.pid}-0123abcd").exists()


def test_published_folders_get_normal_permissions(stories_adapter, tmp_path):
    """Not mkdtemp's 0700: a serving container or another user must be able to read them."""
    _, adapter = stories_adapter
    old = os.umask(0o022)
    try:
        export(adapter, tmp_path / "merged", verify=False)
        model = load_model(asset("models/stories260K"), device="cpu")
        add_lora(model, LoraConfig(r=4, alpha=8))
        save_adapter(model, tmp_path / "adapter")
    finally:
        os.umask(old)
    for folder in (tmp_path / "merged", tmp_path / "adapter"):
        assert folder.stat().st_mode & 0o777 == 0o755, folder
        assert all(f.stat().st_mode & 0o777 == 0o644 for f in folder.iterdir()), folder


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generate_leaves_the_global_rng_alone(stories, temperature):
    """Sample generations run at every evaluation; reseeding the global generator there
    would replay the same dropout noise after each one. Sampling is still reproducible."""
    model, tok = load_model(stories, device="cpu"), load_tokenizer(stories)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = generate(model, tok, PROMPTS[0], max_new_tokens=8, temperature=temperature, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert generate(model, tok, PROMPTS[0], max_new_tokens=8, temperature=temperature, seed=5) == first
