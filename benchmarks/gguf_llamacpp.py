"""llama.cpp itself on qlora's GGUF exports of a trained adapter (a script; the slow test
tests/test_gguf_llamacpp.py asserts on the same figures).

    pip install llama-cpp-python        # builds llama.cpp from source, minutes
    .venv/bin/python benchmarks/gguf_llamacpp.py                          # stories260K
    .venv/bin/python benchmarks/gguf_llamacpp.py --smollm2 /work/cache/smollm2   # + SmolLM2-135M

SmolLM2's folder is what ../shared/assets/models/smollm2-135m-instruct/materialize.py writes.
For each model:

1. trains a LoRA adapter for real (`qlora train` on recipes/demo.yaml: r 8 on every linear,
   lr 1e-3, batch 2, 192 tokens; --steps steps on Alpaca for stories260K, --smollm2-steps
   on the `messages` chats for SmolLM2);
2. exports it: safetensors f16 and bf16 (qlora.export), GGUF f16, bf16 and q8_0 (q8_0 only
   where every row is a multiple of 32 wide; stories260K's FFN is 172), the base alone as
   GGUF f16, and the adapter alone as GGUF LoRA;
3. runs fixed prompts through transformers (fp32 compute) on the safetensors export and
   through llama.cpp (llama-cpp-python, CPU) on the GGUF, and compares
   - logits, teacher-forced over each prompt + the reference's 32-token greedy continuation:
     the largest difference, and argmax agreement at every position;
   - greedy continuations (3 x 32 tokens), token for token.
   The yardstick for "fp16 noise" (bf16 for the bf16 GGUF) is transformers itself in fp16
   (bf16) compute against fp32 compute on the same export; for q8_0, transformers on the q8_0
   GGUF's own 8-bit weights (dequantized, fp32 compute). A position where the reference's
   margin between its token and the other side's is below that noise is a near-tie: there,
   rounding alone may pick either token (transformers' own fp16 compute does too), so a
   greedy difference is only a failure when its first token is not a near-tie, and a
   teacher-forced argmax difference only at a margin of at least the noise. The same for
   llama.cpp's base GGUF + GGUF LoRA against the merged model (transformers) and against
   llama.cpp's merged f16 GGUF;
4. checks llama.cpp's tokenizer against the Hugging Face one on a few texts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ASSETS = Path(os.environ.get("QLORA_ASSETS") or REPO.parent / "shared" / "assets")

PLAIN = ["Once upon a time, there was a little girl named Lily.", "The dog ran to the park and",
         "Tom had a big red ball. He"]
CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "Give me three tips for sleeping well."]
# Texts both tokenizers split the same way. Not here: text that starts with whitespace or
# follows a special token directly, in SentencePiece-style vocabularies: llama.cpp always
# prepends "▁" there, Hugging Face's Metaspace(prepend_scheme="first") only when the text
# does not already begin with a space.
TOKEN_TEXTS = ["Once upon a time, there was a little girl named Lily.",
               "Numbers: 12345 3.14159 and 2024-01-01", "def f(x):\n    return x**2  # square",
               "héllo wörld — naïve café 你好 🙂", "don't I'll we've THEY'RE", "a  b\t\tc\n\nd"]
GREEDY_TOKENS = 32


def train_adapter(base: Path, data: Path, steps: int, out: Path) -> Path:
    from qlora.config import load_recipe
    from qlora.train import train
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [
        f"model.name_or_path={base}", f"data.path={data}", "data.format=auto",
        f"train.output_dir={out}", f"train.max_steps={steps}", "data.eval_ratio=0",
        f"train.eval_steps={steps}",
        f"train.save_steps={steps}", "train.batch_size=2", "data.max_seq_len=192"])
    summary = train(recipe)
    return Path(summary["run_dir"])


def prompts(tokenizer, chat: bool) -> list[list[int]]:
    if chat:
        return [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False) for c in CHAT]
    return [tokenizer(p)["input_ids"] for p in PLAIN]


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int]) -> list[int]:
    out = list(ids)
    for _ in range(GREEDY_TOKENS):  # full forward each step: the same math as the logits check
        out.append(int(hf_logits(model, out)[-1].argmax()))
    return out[len(ids):]


def llama(path: Path, lora: Path | None = None, threads: int = 2, **kw):
    """llama.cpp on `path` (+ a LoRA), with its plain CPU kernels: the "extra buffer types"
    (AMX here) that repack quantized weights crash this machine's llama.cpp build on Q8_0 and
    Q4_1 alike (also on the asset's own llama.cpp-made Q4_1 GGUF), so they are switched off.
    llama-cpp-python has no argument for that; its model-params factory is wrapped instead."""
    import llama_cpp.llama_cpp as bindings  # the module Llama takes its defaults from
    from llama_cpp import Llama
    factory = bindings.llama_model_default_params

    def plain():
        params = factory()
        params.use_extra_bufts = False
        return params
    bindings.llama_model_default_params = plain
    try:
        llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512,
                    logits_all=True, n_threads=threads, verbose=False, seed=0, **kw)
    finally:
        bindings.llama_model_default_params = factory
    assert not llm.model_params.use_extra_bufts
    return llm


def lc_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def lc_greedy(llm, ids: list[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(GREEDY_TOKENS):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def tokenizer_mismatches(llm, tok, texts=TOKEN_TEXTS) -> list[str]:
    """The texts llama.cpp tokenizes differently from the Hugging Face tokenizer (BOS included
    when the tokenizer adds it; GGUF's add_bos_token says so)."""
    return [t for t in texts if llm.tokenize(t.encode(), add_bos=True, special=True) != tok(t)["input_ids"]]


def compare_logits(ref: list[np.ndarray], got: list[np.ndarray], noise: float | None = None) -> dict:
    """Largest logit difference and argmax agreement over every position; with `noise`, also
    the argmax differences that are not near-ties (the reference's margin between its token and
    `got`'s is at least `noise`)."""
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, got))
    scale = max(float(np.abs(a).max()) for a in ref)
    r, g = np.concatenate(ref), np.concatenate(got)  # (positions, vocab)
    want, pick = r.argmax(-1), g.argmax(-1)
    out = {"max_logit_diff": diff, "max_abs_logit": scale, "rel": diff / scale,
           "argmax_agreement": float(np.mean(want == pick)), "positions": len(want)}
    if noise is not None:
        rows = np.arange(len(want))
        margin = r[rows, want] - r[rows, pick]  # 0 where they agree
        out["argmax_differences_beyond_noise"] = int(np.sum(margin >= noise))
    return out


def compare_greedy(ref_model, ids: list[list[int]], want: list[list[int]], got: list[list[int]],
                   noise: float) -> dict:
    """Greedy continuations `got` against `want` (same prompts `ids`), token for token. At each
    prompt's first difference the context is still shared, so the reference model's logits
    there say how close the call was: `ref_margin` = its logit for `want`'s token minus its
    logit for `got`'s (negative where `got` is the reference's pick); |margin| below `noise`
    is a near-tie."""
    firsts, equal = [], 0
    for i, (p, w, g) in enumerate(zip(ids, want, got)):
        k = next((j for j, (a, b) in enumerate(zip(w, g)) if a != b), None)
        if k is None:
            equal += len(w)
            continue
        equal += k
        last = hf_logits(ref_model, p + w[:k])[-1]
        firsts.append({"prompt": i, "token": k, "ref_margin": float(last[w[k]] - last[g[k]])})
    return {"greedy_equal": not firsts, "greedy_tokens_equal": equal, "greedy_tokens": sum(map(len, want)),
            "greedy_first_differences": firsts,
            "greedy_differences_near_ties": all(abs(f["ref_margin"]) < noise for f in firsts)}


def train_and_export(name: str, base: Path, data: Path, steps: int, work: Path) -> dict:
    """Steps 1 and 2; returns {"exports": {kind: path}, ...timings}, also kept in
    work/exports.json so that `--reuse` can run the comparison again without retraining."""
    from qlora.export import export
    from qlora.gguf_export import Q8_BLOCK, export_gguf, export_gguf_lora
    t0 = time.perf_counter()
    run = train_adapter(base, data, steps, work / "run")
    r: dict = {"train_steps": steps, "train_seconds": round(time.perf_counter() - t0, 1)}
    exports = {}
    for dt in ("fp16", "bf16"):
        exports["st-" + dt] = export(run, work / f"st-{dt}", dtype=dt, verify=False)["out"]
    cfg = json.loads((base / "config.json").read_text())
    q8 = all(w % Q8_BLOCK == 0 for w in (cfg["hidden_size"], cfg["intermediate_size"]))
    for dt in ("f16", "bf16") + (("q8_0",) if q8 else ()):
        rep = export_gguf(run, work / f"{name}-{dt}.gguf", dtype=dt)
        exports[dt] = rep["out"]
        r[f"export_{dt}_seconds"] = rep["seconds"]
    exports["base"] = export_gguf(run, work / f"{name}-base-f16.gguf", base_only=True)["out"]
    exports["lora"] = export_gguf_lora(run, work / f"{name}-lora-f16.gguf")["out"]
    r["exports"] = exports
    (work / "exports.json").write_text(json.dumps(r, indent=1))
    return r


def check_model(name: str, base: Path, data: Path, steps: int, work: Path, chat: bool,
                threads: int = 2, reuse: bool = False) -> dict:
    """Everything in the module docstring for one model; returns the figures. `reuse`: take
    the run and exports an earlier call left in `work` (exports.json) instead of redoing them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    kept = work / "exports.json"
    r = {"model": name, **(json.loads(kept.read_text()) if reuse and kept.is_file()
                           else train_and_export(name, base, data, steps, work))}
    exports = {k: Path(v) for k, v in r.pop("exports").items()}
    r["modelfile"] = exports["f16"].with_suffix(".Modelfile").read_text()

    tok = AutoTokenizer.from_pretrained(exports["st-fp16"])
    ids = prompts(tok, chat)
    hf = {dt: AutoModelForCausalLM.from_pretrained(exports["st-" + dt], dtype=torch.float32).eval()
          for dt in ("fp16", "bf16")}
    ref_greedy = {dt: [hf_greedy(m, p) for p in ids] for dt, m in hf.items()}
    # Teacher-forced: every comparison reads the same sequences, prompt + fp16 reference's greedy
    # continuation, so argmax agreement covers the generated tokens too.
    seqs = [p + g for p, g in zip(ids, ref_greedy["fp16"])]
    ref = {dt: [hf_logits(m, s) for s in seqs] for dt, m in hf.items()}
    # What each GGUF type's rounding alone does, in transformers against its own fp32 compute:
    # fp16 / bf16 compute on the fp16 / bf16 export, and the q8_0 GGUF's own 8-bit weights
    # (dequantized by transformers' GGUF reader) in fp32 compute. Each GGUF is held to its type's.
    roundings = {"f16": ("fp16", "transformers_fp16_noise", exports["st-fp16"], {"dtype": torch.float16}),
                 "bf16": ("bf16", "transformers_bf16_noise", exports["st-bf16"], {"dtype": torch.bfloat16})}
    if "q8_0" in exports:
        roundings["q8_0"] = ("fp16", "transformers_q8_0_weights", exports["q8_0"].parent,
                             {"gguf_file": exports["q8_0"].name, "dtype": torch.float32})
    noise = {}
    for dt, (st, key, path, load) in roundings.items():
        model = AutoModelForCausalLM.from_pretrained(path, **load).eval()
        r[key] = compare_logits(ref[st], [hf_logits(model, s) for s in seqs])
        noise[dt] = r[key]["max_logit_diff"]
        r[key] |= compare_greedy(hf[st], ids, ref_greedy[st], [hf_greedy(model, p) for p in ids], noise[dt])
        del model

    def run_gguf(key: str, dt: str, path: Path, st: str, lora: Path | None = None) -> list[list[int]]:
        """llama.cpp on one GGUF (type `dt`) against transformers on safetensors export `st`;
        returns its greedy continuations."""
        llm = llama(path, lora, threads=threads)
        r[key] = compare_logits(ref[st], [lc_logits(llm, s) for s in seqs], noise[dt])
        greedy = [lc_greedy(llm, p) for p in ids]
        llm.close()
        r[key] |= compare_greedy(hf[st], ids, ref_greedy[st], greedy, noise[dt])
        return greedy

    for dt, st in (("f16", "fp16"), ("bf16", "bf16"), ("q8_0", "fp16")):
        if dt in exports:
            greedy = run_gguf(f"gguf_{dt}", dt, exports[dt], st)
            if dt == "f16":
                merged_greedy = greedy
    lora_greedy = run_gguf("gguf_base_plus_lora", "f16", exports["base"], "fp16", exports["lora"])
    # against llama.cpp's merged f16 GGUF; the margin at a difference is still transformers'
    r["gguf_base_plus_lora"]["vs_merged_gguf"] = compare_greedy(hf["fp16"], ids, merged_greedy, lora_greedy,
                                                                noise["f16"])
    base_llm = llama(exports["base"], threads=threads)  # the adapter must change something
    r["gguf_base_alone"] = compare_logits(ref["fp16"], [lc_logits(base_llm, s) for s in seqs])
    base_llm.close()

    vocab = llama(exports["f16"], threads=threads)
    r["tokenizer_mismatches"] = tokenizer_mismatches(vocab, tok)
    if chat:  # the chat prompt itself, special tokens included
        text = tok.apply_chat_template([{"role": "user", "content": CHAT[0]}], tokenize=False,
                                       add_generation_prompt=True)
        if vocab.tokenize(text.encode(), add_bos=False, special=True) != ids[0]:
            r["tokenizer_mismatches"].append(text)
    vocab.close()
    r["seconds"] = round(time.perf_counter() - t0, 1)
    return r


def table(results: list[dict]) -> str:
    rows = ["| model | GGUF / compute | vs | max abs logit diff | / max abs logit | argmax agree | "
            "argmax differs, margin ≥ noise of its type | greedy 3x32 | first differences: token (reference margin) |",
            "|---|---|---|---|---|---|---|---|---|"]

    def greedy(x: dict) -> tuple[str, str]:
        if x["greedy_equal"]:
            return "equal", ""
        verdict = "near-ties only" if x["greedy_differences_near_ties"] else "NOT near-ties"
        return (f"{x['greedy_tokens_equal']}/{x['greedy_tokens']} equal, {verdict}",
                ", ".join(f"p{f['prompt']} t{f['token']} ({f['ref_margin']:.4f})" for f in x["greedy_first_differences"]))

    for r in results:
        for key, label, vs in (("transformers_fp16_noise", "transformers fp16 compute", "safetensors fp16, fp32 compute"),
                               ("transformers_bf16_noise", "transformers bf16 compute", "safetensors bf16, fp32 compute"),
                               ("transformers_q8_0_weights", "transformers on the q8_0 GGUF's weights, fp32 compute",
                                "safetensors fp16, fp32 compute")):
            if key in r:
                n, g = r[key], greedy(r[key])
                rows.append(f"| {r['model']} | {label} (noise) | {vs} | {n['max_logit_diff']:.4g} | {n['rel']:.2%} | "
                            f"{n['argmax_agreement']:.1%} of {n['positions']} | | {g[0]} | {g[1]} |")
        for key, label, vs in (("gguf_f16", "f16", "safetensors fp16"), ("gguf_bf16", "bf16", "safetensors bf16"),
                               ("gguf_q8_0", "q8_0", "safetensors fp16"),
                               ("gguf_base_plus_lora", "base f16 + LoRA f16", "safetensors fp16 (merged)"),
                               ("gguf_base_alone", "base f16, no LoRA", "safetensors fp16 (merged)")):
            if key not in r:
                continue
            x = r[key]
            g = greedy(x) if "greedy_equal" in x else ("", "")
            rows.append(f"| {r['model']} | {label} | {vs} | {x['max_logit_diff']:.4g} | {x['rel']:.2%} | "
                        f"{x['argmax_agreement']:.1%} of {x['positions']} | {x.get('argmax_differences_beyond_noise', '')} | "
                        f"{g[0]} | {g[1]} |")
            if "vs_merged_gguf" in x:
                g = greedy(x["vs_merged_gguf"])
                rows.append(f"| {r['model']} | {label} | llama.cpp f16 GGUF (merged) | | | | | {g[0]} | {g[1]} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", type=Path, help="materialized SmolLM2-135M-Instruct folder (materialize.py)")
    ap.add_argument("--steps", type=int, default=30, help="stories260K training steps (default 30)")
    ap.add_argument("--smollm2-steps", type=int, default=8, help="SmolLM2 training steps (default 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="keep the runs and exports in this folder")
    ap.add_argument("--reuse", action="store_true",
                    help="with --keep: reuse the runs and exports a previous run left there")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="gguf-llamacpp-"))
    models = [("stories260K", ASSETS / "models" / "stories260K", ASSETS / "data" / "alpaca_5000.json",
               a.steps, False, "stories260K")]
    if a.smollm2:
        models.append(("SmolLM2-135M", a.smollm2, ASSETS / "data" / "messages_300.json", a.smollm2_steps,
                       True, "smollm2"))
    results = []
    try:
        for name, base, data, steps, chat, folder in models:
            results.append(check_model(name, base, data, steps, work / folder, chat=chat, threads=a.threads,
                                       reuse=a.reuse))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "modelfile"}, indent=1), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))


if __name__ == "__main__":
    main()
