"""llama.cpp itself runs the GGUF exports of a trained adapter (slow; needs llama-cpp-python,
which builds llama.cpp from source: `pip install llama-cpp-python`).

    bash dev.sh test --slow tests/test_gguf_llamacpp.py      (or pytest --slow ...)

The work is benchmarks/gguf_llamacpp.py's `check_model` (train for real, export, run in
llama.cpp and transformers); here its figures are asserted. SmolLM2-135M comes from
$QLORA_SMOLLM2 when set (a folder written by the asset's materialize.py), else it is
materialized into the test's temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import asset

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gguf_llamacpp import check_model, tokenizer_mismatches  # noqa: E402


def assert_llamacpp_matches(r: dict) -> None:
    # transformers itself, fp16 (bf16) vs fp32 compute on the same export: what rounding alone does
    noise = r["transformers_fp16_noise"]["max_logit_diff"]
    f16 = r["gguf_f16"]
    # f16: llama.cpp's logits differ from transformers' (fp32 compute, same fp16 weights) by no
    # more than transformers' own fp16-compute noise on the same model. Argmax (teacher-forced
    # over prompts + greedy continuations) and greedy text agree wherever the reference's margin
    # is above that noise: a greedy run may part only at a near-tie, as fp16 transformers may.
    assert f16["max_logit_diff"] <= max(noise, 1e-3 * f16["max_abs_logit"]), f16
    assert f16["argmax_differences_beyond_noise"] == 0 and f16["greedy_differences_near_ties"], f16
    assert f16["argmax_agreement"] >= 0.99, f16
    lora = r["gguf_base_plus_lora"]  # base GGUF + GGUF LoRA, applied by llama.cpp at run time
    assert lora["argmax_differences_beyond_noise"] == 0 and lora["greedy_differences_near_ties"], lora
    assert lora["vs_merged_gguf"]["greedy_differences_near_ties"], lora
    assert lora["max_logit_diff"] <= max(2 * noise, 2e-3 * lora["max_abs_logit"]), lora
    assert r["gguf_base_alone"]["max_logit_diff"] > 20 * f16["max_logit_diff"]  # the adapter matters
    bf16 = r["gguf_bf16"]  # bf16 activations in llama.cpp: coarser, held to transformers' bf16 noise
    assert bf16["max_logit_diff"] <= r["transformers_bf16_noise"]["max_logit_diff"], bf16
    assert bf16["argmax_differences_beyond_noise"] == 0 and bf16["greedy_differences_near_ties"], bf16
    assert r["tokenizer_mismatches"] == []


@pytest.mark.parametrize("which,rel,n_vocab", [
    ("stories-sentencepiece", "models/stories260K", 512),  # tokenizer.model's scores
    ("stories-tokenizer.json", "models/stories260K", 512),  # scores from the merge ranks
    ("smollm2", "models/smollm2-135m-instruct", 49152),  # byte-level BPE, gpt-2 split
    ("llama-3.1", "tokenizers/llama-3.1-instruct", 128256),  # byte-level BPE, llama-bpe split
    ("mistral-v0.3", "tokenizers/mistral-7b-v0.3-instruct", 32768),  # byte-fallback BPE, no .model
])
def test_llamacpp_tokenizes_like_transformers(tmp_path, monkeypatch, which, rel, n_vocab):
    import shutil
    from llama_cpp import Llama
    from transformers import AutoTokenizer
    import qlora.gguf_vocab
    from qlora.gguf_export import export_gguf
    from conftest import write_tiny_model
    from test_export import make_adapter
    if which == "stories-tokenizer.json":
        monkeypatch.setattr(qlora.gguf_vocab, "_has_sentencepiece", lambda: False)
    src = asset(rel)
    base = write_tiny_model(tmp_path / "base", vocab_size=n_vocab, tie_word_embeddings=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, base / f.name)
    export_gguf(make_adapter(base, tmp_path / "adapter"), tmp_path / "t.gguf", base_only=True, verify=False)
    llm = Llama(model_path=str(tmp_path / "t.gguf"), vocab_only=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(src)
    assert tokenizer_mismatches(llm, tok) == []
    if tok.chat_template:  # a rendered chat, special tokens and all
        text = tok.apply_chat_template([{"role": "user", "content": "Name a color."}], tokenize=False,
                                       add_generation_prompt=True)
        adds_bos = tok("x")["input_ids"][0] == tok.bos_token_id
        text = text.removeprefix(tok.bos_token) if adds_bos else text  # tokenizing adds it again
        want = tok(text)["input_ids"]
        got = llm.tokenize(text.encode(), add_bos=True, special=True)
        if which == "mistral-v0.3":
            # llama.cpp's SentencePiece-style tokenizer prepends "▁" to text that follows a special
            # token ([INST] here); Hugging Face's (legacy=False) does not. Any GGUF of this
            # tokenizer does it; the metadata has no switch for it. Only that may differ:
            space = tok.convert_tokens_to_ids("▁")
            special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
            got = [t for i, t in enumerate(got) if not (t == space and i and got[i - 1] in special)]
        assert got == want
    llm.close()


def test_llamacpp_runs_stories260k_exports(tmp_path):
    r = check_model("stories260K", asset("models/stories260K"), asset("data/alpaca_5000.json"),
                    steps=30, work=tmp_path, chat=False)
    assert "gguf_q8_0" not in r  # FFN 172 wide: q8_0 refused
    assert_llamacpp_matches(r)


def test_llamacpp_runs_smollm2_exports(tmp_path):
    shipped = asset("models/smollm2-135m-instruct")
    folder = Path(os.environ.get("QLORA_SMOLLM2") or tmp_path / "smollm2")
    if not (folder / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(shipped / "materialize.py"), str(folder)], check=True)
    r = check_model("SmolLM2-135M", folder, asset("data/messages_300.json"), steps=8,
                    work=tmp_path / "work", chat=True)
    assert_llamacpp_matches(r)
    # q8_0: 8-bit weights, and in llama.cpp's matmuls 8-bit activations too: at most twice what
    # the weights alone do in transformers, and its answers differ only where those weights' do
    q8, weights = r["gguf_q8_0"], r["transformers_q8_0_weights"]
    assert q8["max_logit_diff"] <= 2 * weights["max_logit_diff"], q8
    assert q8["argmax_differences_beyond_noise"] == 0 and q8["greedy_differences_near_ties"], q8
    assert "TEMPLATE" in r["modelfile"] and "<|im_start|>" in r["modelfile"]
