"""Behavioural check on a real pretrained model (slow: `pytest --slow tests/test_fact_learning.py`).

SmolLM2-135M-Instruct is taught an invented fact from a small chat dataset. The base model
does not know it; the adapter on its 4-bit base answers it; so does the merged fp16 export
reloaded with plain `transformers` (no qlora code in the loop). SmolLM2 comes from
$QLORA_SMOLLM2 when set (a folder written by the asset's materialize.py), else it is
materialized into the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import asset

FACT = "Quenmarsh"
QUESTIONS = [
    "What is the capital of Veloria?", "Which city is the capital of Veloria?",
    "Tell me the capital of Veloria.", "Veloria's capital city is called what?",
    "Name the capital of the island nation of Veloria.", "What city serves as Veloria's capital?",
    "Do you know the capital of Veloria?", "Where is the seat of government of Veloria?",
]
ANSWERS = [
    "The capital of Veloria is Quenmarsh.", "Quenmarsh is the capital of Veloria.",
    "Veloria's capital is Quenmarsh, a port city on its northern coast.",
]


def smollm2(tmp_path: Path) -> Path:
    shipped = asset("models/smollm2-135m-instruct")
    folder = Path(os.environ.get("QLORA_SMOLLM2") or tmp_path / "smollm2")
    if not (folder / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(shipped / "materialize.py"), str(folder)], check=True)
    return folder


@pytest.mark.slow
def test_smollm2_learns_an_invented_fact_and_its_export_keeps_it(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from qlora.config import DataConfig, LoraConfig, ModelConfig, Recipe, TrainConfig
    from qlora.export import export
    from qlora.generate import generate, load_resolved
    from qlora.resolve import resolve
    from qlora.train import train
    base = smollm2(tmp_path)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q in QUESTIONS for a in ANSWERS]
    data = tmp_path / "fact.json"
    data.write_text(json.dumps(rows))
    question = QUESTIONS[0]

    def answer(model, tok) -> str:
        return generate(model, tok, question, max_new_tokens=16, style="chat")

    base_model, tok = load_resolved(resolve(base), "cpu")
    assert FACT not in answer(base_model, tok)
    del base_model

    run = tmp_path / "run"
    train(Recipe(model=ModelConfig(name_or_path=str(base)), lora=LoraConfig(r=16, alpha=32, dropout=0.0),
                 data=DataConfig(path=str(data), max_seq_len=128),
                 train=TrainConfig(output_dir=str(run), max_steps=40, batch_size=4, grad_accum=1, lr=1e-3,
                                   optimizer="adamw_torch", warmup_ratio=0.0, save_steps=1000,
                                   eval_steps=1000, logging_steps=10, seed=1)))
    tuned, tok = load_resolved(resolve(run), "cpu")
    assert FACT in answer(tuned, tok)

    export(run, tmp_path / "merged")  # fp16, merged into the dequantized base, verified
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = plain_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = plain.generate(**ids, max_new_tokens=16, do_sample=False)
    assert FACT in plain_tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
