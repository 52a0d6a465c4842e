"""`qlora demo`: the whole pipeline on a built-in task, with nothing downloaded.

1. Build a small Llama-style model (random weights, saved as a bf16 Hugging Face
   checkpoint) and a word-level tokenizer with a chat template, locally.
2. Make a task: for a 5-digit number, answer "describe 4 8 2 1 7 ?" with the last digit as a
   word and its parity ("seven odd"). Train and test numbers are disjoint, so test accuracy
   measures a learned rule, not memorised rows.
3. Quantize the base to NF4, train LoRA with the real trainer (checkpoints, eval, metrics),
   export a merged fp16 checkpoint, reload it with plain transformers, and generate.
4. Report loss and exact-match accuracy before/after, export parity, time and peak memory.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch

from .errors import QloraError

DIGIT_WORDS = "zero one two three four five six seven eight nine".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [*DIGIT_WORDS, "even", "odd", "describe", "?", "answer:"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<s> {{ m['content'] }} answer:"
    "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")
MARKER = ".qlora-demo"
N_TEST = 100


def build_tokenizer(out: Path):
    """A word-level tokenizer: special tokens, digits one per token, the task's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list("0123456789") + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_base_model(out: Path, vocab_size: int) -> None:
    """A random 2-layer Llama, saved in bf16 like a downloaded 16-bit checkpoint."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out)


def question(n: int) -> tuple[str, str]:
    return f"describe {' '.join(str(n))} ?", f"{DIGIT_WORDS[n % 10]} {'even' if n % 2 == 0 else 'odd'}"


def write_task(out: Path, seed: int) -> tuple[Path, Path, list[tuple[str, str]]]:
    rng = random.Random(seed)
    numbers = rng.sample(range(10000, 100000), 3000 + N_TEST)
    rows = [question(n) for n in numbers]

    def dump(path: Path, part):
        with open(path, "w") as f:
            for q, a in part:
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": a}]}) + "\n")
        return path
    out.mkdir(parents=True, exist_ok=True)
    return dump(out / "train.jsonl", rows[N_TEST:]), dump(out / "test.jsonl", rows[:N_TEST]), rows[:N_TEST]


@torch.no_grad()
def accuracy(model, tokenizer, rows) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy answers (the answer must be followed by </s>)."""
    from .generate import generate
    answers = [generate(model, tokenizer, q, max_new_tokens=4).strip() for q, _ in rows]
    return sum(a == gold for a, (_, gold) in zip(answers, rows)) / len(rows), answers


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise QloraError(f"{out}: not empty and not a demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `qlora demo`; safe to delete\n")


def run_demo(out: Path, steps: int | None = None, seed: int = 0) -> dict:
    from .config import DataConfig, LoraConfig, ModelConfig, Recipe, TrainConfig
    from .evaluate import evaluate_model
    from .export import export
    from .generate import load_for_generation
    from .metrics import peak_memory_gb
    from .train import train
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    torch.manual_seed(seed)
    _prepare_out(out)
    tokenizer = build_tokenizer(out / "base")
    build_base_model(out / "base", len(tokenizer))
    train_file, test_file, test_rows = write_task(out / "data", seed)
    print(f"[1/5] built a {sum(1 for _ in open(train_file))}-example task and a random "
          f"2-layer Llama in {out / 'base'}")

    recipe = Recipe(
        model=ModelConfig(name_or_path=str(out / "base")),
        lora=LoraConfig(r=16, alpha=32, dropout=0.0),
        data=DataConfig(path=str(train_file), eval_path=str(test_file), format="messages",
                        max_seq_len=32, group_by_length=True),
        train=TrainConfig(output_dir=str(out / "run"), max_steps=steps or 250, batch_size=16,
                          grad_accum=1, lr=3e-3, warmup_ratio=0.05, schedule="cosine",
                          max_grad_norm=1.0, eval_steps=125, save_steps=125, logging_steps=25,
                          seed=seed, sample_prompts=[test_rows[0][0]], sample_max_new_tokens=4))

    model, tok = load_for_generation_base(recipe)
    loss_before = evaluate_model(model, tok, test_file, format="messages", max_seq_len=32)["loss"]
    acc_before, _ = accuracy(model, tok, test_rows)
    print(f"[2/5] NF4 base + untrained LoRA: test loss {loss_before:.3f}, accuracy {acc_before:.0%}")
    del model

    summary = train(recipe)
    model, tok = load_for_generation(out / "run")
    acc_after, answers = accuracy(model, tok, test_rows)
    loss_after = evaluate_model(model, tok, test_file, format="messages", max_seq_len=32)["loss"]
    print(f"[3/5] trained {summary['steps']} steps: test loss {loss_after:.3f}, accuracy {acc_after:.0%}")

    report = export(out / "run", out / "merged", dtype="fp16")
    print(f"[4/5] exported merged fp16 model to {out / 'merged'} "
          f"(max |logit diff| vs adapter: {report['max_logit_diff']:.4f})")

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    acc_merged, merged_answers = accuracy(merged, tok, test_rows)
    agree = sum(a == b for a, b in zip(answers, merged_answers)) / len(answers)
    q, gold = test_rows[0]
    print(f"[5/5] plain transformers on the merged model: accuracy {acc_merged:.0%}, "
          f"same answers as the adapter on {agree:.0%} of prompts")
    print(f"      e.g. '{q}' -> '{merged_answers[0]}' (expected '{gold}')")

    result = {"loss_before": loss_before, "loss_after": loss_after, "acc_before": acc_before,
              "acc_after": acc_after, "acc_merged": acc_merged, "agreement": agree,
              "max_logit_diff": report["max_logit_diff"], "seconds": time.perf_counter() - start,
              "peak_mem_gb": peak_memory_gb(torch.device("cpu"))}
    print("\n".join([
        "", "qlora demo report",
        f"  test loss        {loss_before:.3f} -> {loss_after:.3f}",
        f"  test accuracy    {acc_before:.0%} -> {acc_after:.0%} (adapter on NF4 base), "
        f"{acc_merged:.0%} (merged fp16, plain transformers)",
        f"  export parity    max |logit diff| {report['max_logit_diff']:.4f}; "
        f"greedy answers agree on {agree:.0%}",
        f"  time             {result['seconds']:.0f} s",
        f"  peak memory      {result['peak_mem_gb']:.2f} GB (process RSS)",
        f"  outputs          {out}/run (adapter, checkpoints, metrics.jsonl, loss.png), {out}/merged"]))
    (out / "report.json").write_text(json.dumps(result, indent=2))
    return result


def load_for_generation_base(recipe):
    """The NF4 base with a fresh (B = 0) LoRA: what training starts from."""
    from .lora import add_lora
    from .model import load_model, load_tokenizer
    model = load_model(recipe.model.name_or_path)
    add_lora(model, recipe.lora)
    return model.eval(), load_tokenizer(recipe.model.name_or_path)

