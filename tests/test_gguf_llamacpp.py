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
from gguf_llamacpp import check_model  # noqa: E402


def assert_llamacpp_matches(r: dict) -> None:
    noise = r["transformers_fp16_noise"]["max_logit_diff"]  # transformers itself, fp16 vs fp32 compute
    f16 = r["gguf_f16"]
    # f16: llama.cpp's logits differ from transformers' (fp32 compute, same fp16 weights) by no
    # more than transformers' own fp16-compute noise on the same model; greedy text identical.
    assert f16["max_logit_diff"] <= max(noise, 1e-3 * f16["max_abs_logit"]), f16
    assert f16["argmax_agreement"] == 1.0 and f16["greedy_equal"], f16
    lora = r["gguf_base_plus_lora"]  # base GGUF + GGUF LoRA, applied by llama.cpp at run time
    assert lora["greedy_equal"] and lora["greedy_equal_to_merged_gguf"], lora
    assert lora["max_logit_diff"] <= max(2 * noise, 2e-3 * lora["max_abs_logit"]), lora
    assert r["gguf_base_alone"]["max_logit_diff"] > 20 * f16["max_logit_diff"]  # the adapter matters
    bf16 = r["gguf_bf16"]  # bf16 activations in llama.cpp: coarser, same answers
    assert bf16["rel"] < 0.02 and bf16["argmax_agreement"] >= 0.95, bf16
    assert r["tokenizer_mismatches"] == []


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
    q8 = r["gguf_q8_0"]  # 8-bit weights: a real but small change
    assert q8["rel"] < 0.05 and q8["argmax_agreement"] >= 0.9, q8
    assert "TEMPLATE" in r["modelfile"] and "<|im_start|>" in r["modelfile"]
