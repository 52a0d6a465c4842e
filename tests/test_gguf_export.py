"""GGUF export for llama.cpp and Ollama: read back with gguf's own reader and with transformers'
GGUF loader (an independent implementation of llama.cpp's layout), compared with the
safetensors export of the same adapter; metadata, tokenizer and Modelfile round trips; errors.

llama.cpp itself runs these files in test_gguf_llamacpp.py (slow, needs llama-cpp-python).
"""

from __future__ import annotations

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlora.gguf_arch as gguf_arch
from qlora.cli import main
from qlora.errors import QloraError
from qlora.export import export
from qlora.gguf_export import export_gguf, export_gguf_lora
from qlora.safetensors_io import checkpoint_files

from conftest import asset, write_tiny_model
from test_export import make_adapter, stories_adapter  # noqa: F401 (fixtures)

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def stories_exports(stories_adapter, tmp_path_factory):
    """The safetensors export and the GGUF export of the same adapter, fp16 and bf16."""
    _, adapter = stories_adapter
    d = tmp_path_factory.mktemp("exports")
    out = {}
    for st, gg in (("fp16", "f16"), ("bf16", "bf16")):
        export(adapter, d / f"st-{st}", dtype=st, verify=False)
        out[gg] = (d / f"st-{st}", d / f"m-{gg}.gguf", export_gguf(adapter, d / f"m-{gg}.gguf", dtype=gg))
    return out


def safetensors_export(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in checkpoint_files(folder):
        out.update(load_file(str(f)))
    return out


def field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def llama_cpp_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order, as its converter writes it (convert_hf_to_gguf, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def raw_tensor(t) -> torch.Tensor:
    """A GGUFReader tensor as PyTorch (rows, cols) values: F16/BF16 in their dtype, Q8_0 as fp32."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type == Q.F16 or t.tensor_type == Q.F32:
        return torch.from_numpy(np.array(t.data)).reshape(shape)
    if t.tensor_type == Q.BF16:
        return torch.from_numpy(np.array(t.data)).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type)).reshape(shape)


def hf_name_of(gguf_name: str, st_names) -> str:
    m = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 64)
    return next(n for n in st_names if m.get_name(n, try_suffixes=(".weight", ".bias")) == gguf_name)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_every_tensor_reads_back_bitwise_as_the_safetensors_export(stories_exports, dtype):
    st_dir, path, report = stories_exports[dtype]
    assert report["verified"] and report["verified_tensors"] == 47 and report["max_abs_diff"] == 0.0
    assert report["tensors_merged"] == 35 and report["architecture"] == "llama"
    st = safetensors_export(st_dir)
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == len(st) == 47  # tied head: no output.weight, as in safetensors
    heads = {"attn_q": 8, "attn_k": 4}
    for t in reader.tensors:
        name = hf_name_of(t.name, st)
        want = st[name]
        if want.dim() == 1:  # norms: F32, exactly the exported value
            assert t.tensor_type == Q.F32
        else:
            assert t.tensor_type == {"f16": Q.F16, "bf16": Q.BF16}[dtype]
            kind = t.name.split(".")[-2]
            if kind in heads:
                want = llama_cpp_rows(want, heads[kind])
        got = raw_tensor(t)
        assert torch.equal(got, want.to(got.dtype)) and torch.equal(got.to(want.dtype), want), t.name

    # transformers' own GGUF loader (its own reverse permutation) gives the same model.
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    sd = model.state_dict()
    for name, want in st.items():
        assert torch.equal(sd[name], want.float()), name


def test_q8_0_is_within_one_step_at_realistic_sizes(tmp_path):
    """Tensors of a 1B-class model (2048 wide, FFN 5632, GQA 16/4 heads): q8_0 within one
    quantization step of each 32-block of the fp16 export (plus that export's own rounding),
    f16 bitwise; both load as models in transformers' GGUF reader. (q8_0 logits on real
    weights: benchmarks/gguf_llamacpp.py.)"""
    base = write_tiny_model(tmp_path / "base", hidden_size=2048, intermediate_size=5632, num_hidden_layers=1,
                            num_attention_heads=16, num_key_value_heads=4, vocab_size=1024,
                            dtype=torch.bfloat16)
    for f in asset("models/stories260K").glob("tokenizer*"):  # 512 tokens: 512 [PAD] rows
        shutil.copy(f, base / f.name)
    adapter = make_adapter(base, tmp_path / "adapter", std=0.02)
    export(adapter, tmp_path / "st", verify=False)
    st = safetensors_export(tmp_path / "st")
    rep = export_gguf(adapter, tmp_path / "m.gguf", dtype="q8_0")
    assert rep["verified_tensors"] == len(st) and rep["max_abs_diff"] > 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for t in reader.tensors:
        name = hf_name_of(t.name, st)
        want = st[name].float()
        if want.dim() == 1:
            assert t.tensor_type == Q.F32
            assert (raw_tensor(t) - want).abs().max() <= want.abs().max() * 2**-11, name  # fp32 vs fp16
            continue
        assert t.tensor_type == Q.Q8_0
        kind = t.name.split(".")[-2]
        want = llama_cpp_rows(want, {"attn_q": 16, "attn_k": 4}[kind]) if kind in ("attn_q", "attn_k") else want
        blocks = want.reshape(-1, 32)
        step = blocks.abs().amax(-1, keepdim=True) / 127
        diff = (raw_tensor(t).reshape(-1, 32) - blocks).abs()
        assert bool((diff <= step + blocks.abs() * 2**-11).all()), name
        assert diff.max() > 0, name  # really quantized

    export_gguf(adapter, tmp_path / "f16.gguf", dtype="f16")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "st", dtype=torch.float32).eval()
    f16 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f16.gguf", dtype=torch.float32).eval()
    q8 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.equal(f16(ids).logits, want)
        err = (q8(ids).logits - want).abs().max() / want.abs().max()
    assert 0 < err < 0.05  # random weights: small logits, so a loose relative bound


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_architectures_load_in_transformers_gguf_reader(tmp_path, model_type):
    """Mistral is written as llama (q/k rows reordered); Qwen2 (q/k/v biases) and Qwen3
    (q/k norms, head_dim apart from hidden/heads) keep Hugging Face's row order."""
    from transformers import AutoConfig
    cfg = AutoConfig.for_model(model_type, vocab_size=512, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=128, tie_word_embeddings=False,
                               **({"head_dim": 128} if model_type == "qwen3" else {}))  # 128: transformers' GGUF reader assumes it
    base = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    for f in asset("models/stories260K").glob("tokenizer*"):
        shutil.copy(f, base / f.name)
    adapter = make_adapter(base, tmp_path / "adapter")
    export(adapter, tmp_path / "st", verify=False)
    rep = export_gguf(adapter, tmp_path / "m.gguf")
    arch = {"mistral": "llama"}.get(model_type, model_type)
    assert rep["architecture"] == arch and rep["tensors_merged"] == 14
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert field(reader, "general.architecture") == arch
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_q.bias" in names) == (model_type == "qwen2")
    assert ("blk.0.attn_k_norm.weight" in names) == (model_type == "qwen3")
    if model_type == "qwen3":
        assert field(reader, "qwen3.attention.key_length") == 128
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "st", dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    st = safetensors_export(tmp_path / "st")
    sd = got.state_dict()
    assert all(torch.equal(sd[n], w.float()) for n, w in st.items())
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def llama3_rope_factors(theta: float, dim: int, factor: float, low: float, high: float, ctx: int) -> list[float]:
    """llama.cpp's converter's rope_freqs for rope_type llama3 (convert_hf_to_gguf, LlamaModel)."""
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * np.pi * theta ** (i / dim)
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_rope_scaling(tmp_path, rope):
    base = write_tiny_model(tmp_path / "base", head_dim=32, vocab_size=512,
                            rope_parameters={"rope_theta": 500000.0, **rope})
    for f in asset("models/stories260K").glob("tokenizer*"):
        shutil.copy(f, base / f.name)
    adapter = make_adapter(base, tmp_path / "adapter")
    if rope["rope_type"] == "dynamic":
        with pytest.raises(QloraError, match="rope_parameters.rope_type 'dynamic' is not supported"):
            export_gguf(adapter, tmp_path / "m.gguf")
        assert not any(tmp_path.glob("m.*")) and not any(tmp_path.glob(".m.*"))
        return
    export_gguf(adapter, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert field(reader, "llama.rope.freq_base") == 500000.0
    freqs = {t.name: t for t in reader.tensors}.get("rope_freqs.weight")
    if rope["rope_type"] == "llama3":
        want = llama3_rope_factors(500000.0, 32, 8.0, 1.0, 4.0, 64)
        assert 1.0 in want and 8.0 in want and len(set(want)) > 2  # all three regimes occur
        assert raw_tensor(freqs).tolist() == pytest.approx(want, rel=1e-6)
        assert field(reader, "llama.rope.scaling.type") is None
    else:
        assert freqs is None
        assert field(reader, "llama.rope.scaling.type") == rope["rope_type"]
        assert field(reader, "llama.rope.scaling.factor") == 4.0
    if rope["rope_type"] == "yarn":
        assert field(reader, "llama.rope.scaling.original_context_length") == 32
        assert field(reader, "llama.rope.scaling.yarn_beta_fast") == 32.0


# --------------------------------------------------------------------------- metadata, tokenizer


def test_metadata_and_sentencepiece_tokenizer_round_trip(stories_exports, stories_adapter):
    import sentencepiece
    base, _ = stories_adapter
    reader = gguf.GGUFReader(stories_exports["f16"][1])
    cfg = json.loads((base / "config.json").read_text())
    want = {"general.architecture": "llama", "general.type": "model", "general.name": "m-f16",
            "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
            "llama.block_count": cfg["num_hidden_layers"], "llama.context_length": cfg["max_position_embeddings"],
            "llama.embedding_length": cfg["hidden_size"], "llama.feed_forward_length": cfg["intermediate_size"],
            "llama.attention.head_count": 8, "llama.attention.head_count_kv": 4,
            "llama.rope.dimension_count": 8, "llama.vocab_size": 512,
            "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": True}
    for key, value in want.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(reader, "tokenizer.chat_template") is None  # stories260K has none

    sp = sentencepiece.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    tokens, scores = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    assert tokens == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert scores == pytest.approx([sp.get_score(i) for i in range(sp.vocab_size())])
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert sum(t == gguf.TokenType.BYTE for t in types) == 256 and tokens[3 + 0x41] == "<0x41>"


TOKENIZERS = {  # asset, vocab size, tokenizer.ggml.model/pre, chat layout in the Modelfile
    "smollm2": ("models/smollm2-135m-instruct", 49152, "gpt2", "gpt-2", "ChatML"),
    "llama-3.1": ("tokenizers/llama-3.1-instruct", 128256, "gpt2", "llama-bpe", "Llama 3"),
    "mistral-v0.3": ("tokenizers/mistral-7b-v0.3-instruct", 32768, "llama", "default", "Mistral [INST]"),
}


@pytest.mark.parametrize("which", list(TOKENIZERS))
def test_hf_tokenizers_round_trip_with_chat_template_and_modelfile(tmp_path, which):
    rel, n_vocab, kind, pre, layout = TOKENIZERS[which]
    src = asset(rel)
    base = write_tiny_model(tmp_path / "base", vocab_size=n_vocab, tie_word_embeddings=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, base / f.name)
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out" / "chat.gguf"
    export_gguf(adapter, out, base_only=True, verify=False)  # tensors: checked in the tests above
    reader = gguf.GGUFReader(out)
    tok = AutoTokenizer.from_pretrained(src)
    tj = json.loads((src / "tokenizer.json").read_text())
    assert field(reader, "tokenizer.ggml.model") == kind and field(reader, "tokenizer.ggml.pre") == pre
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == n_vocab and tokens == tok.convert_ids_to_tokens(list(range(n_vocab)))
    types = field(reader, "tokenizer.ggml.token_type")
    special = {t["id"] for t in tj["added_tokens"] if t["special"] and t["content"] != tj["model"].get("unk_token")}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == special
    if kind == "gpt2":
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        assert field(reader, "tokenizer.ggml.merges") == merges
    else:  # scores replay the merge order: a merged token scores above every later merge
        scores = field(reader, "tokenizer.ggml.scores")
        first, later = tj["model"]["merges"][0], tj["model"]["merges"][100]
        first, later = ("".join(first.split(" ")) if isinstance(first, str) else "".join(first),
                        "".join(later.split(" ")) if isinstance(later, str) else "".join(later))
        assert scores[tok.convert_tokens_to_ids(first)] > scores[tok.convert_tokens_to_ids(later)]
    assert field(reader, "tokenizer.chat_template") == tok.chat_template
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_token_id  # SmolLM2: 2; others: none
    assert field(reader, "tokenizer.ggml.add_bos_token") == (tok("x")["input_ids"][0] == tok.bos_token_id)

    modelfile = (tmp_path / "out" / "chat.Modelfile").read_text()
    assert "FROM ./chat.gguf\n" in modelfile
    assert f"#   ollama create chat -f {out.with_suffix('.Modelfile').resolve()}\n" in modelfile
    assert f"# Chat template: {layout}, checked against" in modelfile and 'TEMPLATE """' in modelfile
    assert f'PARAMETER stop "{tok.eos_token}"' in modelfile
    if which == "smollm2":  # its template's default system prompt
        assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
        assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_modelfile_without_a_known_chat_layout(tmp_path, stories_exports):
    from qlora.ollama import match_chat_template
    tok = AutoTokenizer.from_pretrained(asset("models/stories260K"))
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    m = match_chat_template(tok, add_bos=True)
    assert m.layout is None and "matches none of" in m.reason
    text = stories_exports["f16"][1].with_suffix(".Modelfile").read_text()
    assert "TEMPLATE" not in text and "no chat template" in text and 'PARAMETER stop "</s>"' in text


# --------------------------------------------------------------------------- the adapter alone


def test_gguf_lora_on_the_base_gguf_is_the_merged_gguf(stories_adapter, stories_exports, tmp_path):
    """llama.cpp computes W + (alpha / r) * B @ A with r = lora_b's ne[0]: done here on the raw
    GGUF tensors (llama.cpp's layout), it gives the merged GGUF up to its fp16 rounding."""
    _, adapter = stories_adapter
    rep = export_gguf_lora(adapter, tmp_path / "lora.gguf")
    export_gguf(adapter, tmp_path / "base.gguf", base_only=True)
    assert rep["rank"] == 8 and rep["lora_alpha"] == 16.0 and rep["modules"] == 35
    lora = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert field(lora, "general.type") == "adapter" and field(lora, "adapter.type") == "lora"
    assert field(lora, "adapter.lora.alpha") == 16.0 and field(lora, "general.architecture") == "llama"
    lt = {t.name: t for t in lora.tensors}
    assert len(lt) == 70
    base = {t.name: t for t in gguf.GGUFReader(tmp_path / "base.gguf").tensors}
    merged = {t.name: t for t in gguf.GGUFReader(stories_exports["f16"][1]).tensors}
    for name in base:
        if name + ".lora_a" not in lt:
            assert torch.equal(raw_tensor(base[name]), raw_tensor(merged[name])), name
            continue
        a, b = lt[name + ".lora_a"], lt[name + ".lora_b"]
        w = base[name]
        assert a.shape[0] == w.shape[0] and b.shape[1] == w.shape[1] and a.shape[1] == b.shape[0] == 8
        got = raw_tensor(w).float() + 16.0 / 8 * raw_tensor(b).float() @ raw_tensor(a).float()
        want = raw_tensor(merged[name]).float()
        assert (got - want).abs().max() <= want.abs().max() * 2**-10, name


# --------------------------------------------------------------------------- errors and publishing


def _cli(capsys, *args) -> tuple[int, str]:
    code = main(["export", *map(str, args)])
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_inputs_fail_in_one_line_and_write_nothing(stories_adapter, tmp_path, capsys):
    base, adapter = stories_adapter
    out = tmp_path / "out"
    out.mkdir()

    code, err = _cli(capsys, adapter, "--format", "gguf", "--dtype", "q8_0", "--out", out / "m.gguf")
    assert code == 2 and "\n" not in err and "model.layers.0.mlp.down_proj.weight" in err
    assert "172" in err and "multiple of 32" in err

    other = tmp_path / "gemma"
    shutil.copytree(base, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    code, err = _cli(capsys, adapter, "--format", "gguf", "--base", other, "--out", out / "m.gguf")
    assert code == 2 and "\n" not in err and "config.json: model_type 'gemma' is not supported" in err

    (out / "m.gguf").write_text("keep me")
    code, err = _cli(capsys, adapter, "--format", "gguf", "--out", out / "m.gguf")
    assert code == 2 and err == f"qlora: error: {out / 'm.gguf'}: exists (use --force to replace it)"
    assert (out / "m.gguf").read_text() == "keep me"
    (out / "m.gguf").unlink()
    (out / "m.Modelfile").write_text("mine")
    code, err = _cli(capsys, adapter, "--format", "gguf", "--out", out / "m.gguf")
    assert code == 2 and "m.Modelfile: exists" in err and (out / "m.Modelfile").read_text() == "mine"
    (out / "m.Modelfile").unlink()

    code, err = _cli(capsys, adapter, "--format", "gguf-lora", "--dtype", "q8_0", "--out", out / "l.gguf")
    assert code == 2 and "dtype: expected f16, fp16, bf16" in err
    code, err = _cli(capsys, adapter, "--format", "gguf", "--max-shard-size", "1GB", "--out", out / "m.gguf")
    assert code == 2 and "--max-shard-size is for --format safetensors" in err
    code, err = _cli(capsys, adapter, "--dtype", "q8_0", "--out", out / "st")
    assert code == 2 and "--dtype q8_0 is for --format gguf" in err
    assert list(out.iterdir()) == []  # nothing written, no temporary file left


def test_verification_catches_a_layout_bug_and_publishes_nothing(stories_adapter, tmp_path, monkeypatch):
    _, adapter = stories_adapter
    monkeypatch.setattr(gguf_arch.Layout, "to_gguf", lambda self, name, t: t)  # q/k rows not reordered
    with pytest.raises(QloraError, match=r"verification failed: model\.layers\.\d+\.self_attn\.[qk]_proj\.weight"):
        export_gguf(adapter, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_gguf_and_force_replaces(stories_adapter, stories_exports, tmp_path, capsys):
    _, adapter = stories_adapter
    out = tmp_path / "m.gguf"
    assert main(["export", str(adapter), "--format", "gguf", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"llama-cli -m {out}" in text and f"ollama create m -f {tmp_path / 'm.Modelfile'}" in text
    assert "all 47 tensors verified" in text
    first = out.read_bytes()
    assert main(["export", str(adapter), "--format", "gguf", "--dtype", "bf16", "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != first and gguf.GGUFReader(out).tensors[0].tensor_type in (Q.BF16, Q.F32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual modes, not mkstemp's 0600
    st_dir = stories_exports["f16"][0]  # ... nor mkdtemp's 0700 for the safetensors folder
    assert st_dir.stat().st_mode & 0o777 == 0o777 & ~umask

    assert main(["export", str(adapter), "--format", "gguf-lora", "--out", str(tmp_path / "l.gguf")]) == 0
    assert f"--lora {tmp_path / 'l.gguf'}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = capsys.readouterr().out
    assert "llama-cli -m base.gguf --lora" in help_text and "ollama create demo -f demo.Modelfile" in help_text
