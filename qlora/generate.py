"""Text generation from a base + adapter, a run directory, or an exported model."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import QloraError


def encode_prompt(tokenizer, prompt: str, chat: bool | None = None) -> torch.Tensor:
    """Token ids (1, T) for a prompt; through the chat template when the tokenizer has one
    (or when `chat=True`), else as plain text with the tokenizer's BOS."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise QloraError("--chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has BOS
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, chat: bool | None = None, stream: bool = False, seed: int = 0) -> str:
    """Greedy when temperature == 0, else nucleus sampling. Returns only the new text."""
    from transformers import TextStreamer
    ids = encode_prompt(tokenizer, prompt, chat).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    sample = temperature > 0
    eos = [t for t in {tokenizer.eos_token_id, *_end_of_turn_ids(tokenizer)} if t is not None]
    # transformers samples from the global generators. Fork them so that sampling here never
    # shifts the training run's dropout stream (samples are generated at every evaluation);
    # greedy decoding draws nothing and needs no fork.
    cuda = [ids.device.index or 0] if ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, enabled=sample):
        if sample:
            torch.manual_seed(seed)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=sample, temperature=temperature if sample else None,
            top_p=top_p if sample else None, top_k=None, use_cache=True,
            eos_token_id=eos or None, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _end_of_turn_ids(tokenizer) -> list[int]:
    """Chat models end a turn with a token that is not always `eos` (Llama 3: <|eot_id|>)."""
    ids = []
    for tok in ("<|eot_id|>", "<|im_end|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.append(tid)
    return ids


def load_for_generation(target: str | Path, *, base: str | None = None, device=None):
    """(model, tokenizer) for a run directory, an adapter folder, or a full model folder."""
    from .adapter import CONFIG_NAME, load_adapter, read_adapter_config
    from .model import load_model, load_tokenizer
    path = Path(target)
    adapter_dir = None
    if (path / "adapter" / CONFIG_NAME).is_file():  # a finished run directory
        adapter_dir = path / "adapter"
    elif (path / CONFIG_NAME).is_file():
        adapter_dir = path
    if adapter_dir is None:
        if not (path / "config.json").is_file():
            raise QloraError(f"{target}: not a model, adapter or run directory")
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device or "cpu")
        return model.eval(), load_tokenizer(path)
    _, cfg = read_adapter_config(adapter_dir)
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise QloraError(f"{adapter_dir}: adapter names no base model; pass --base")
    quantization = _run_quantization(path) or "nf4"
    model = load_adapter(load_model(base, quantization=quantization, device=device), adapter_dir)
    return model.eval(), load_tokenizer(_run_tokenizer(path) or base)


def _run_recipe(path: Path):
    from .config import load_recipe
    for candidate in (path / "recipe.yaml", path.parent / "recipe.yaml"):
        if candidate.is_file():
            return load_recipe(candidate)
    return None


def _run_quantization(path: Path) -> str | None:
    recipe = _run_recipe(path)
    return recipe.model.quantization if recipe else None


def _run_tokenizer(path: Path) -> str | None:
    recipe = _run_recipe(path)
    return (recipe.model.tokenizer or recipe.model.name_or_path) if recipe else None
