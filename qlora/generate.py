"""Text generation from a run, a checkpoint, an adapter or a full model.

Prompts are rendered the way the run's training data was (`prompt_style`): an Alpaca run
sees the Alpaca template, a chat run the tokenizer's chat template (or the Guanaco-style
default training used without one), a text or prompt/completion run the text as is. A
model trained on Alpaca rows and prompted through a chat template would see a system
prompt and markers it never saw.
"""

from __future__ import annotations

import torch

from .errors import QloraError

PROMPT_STYLES = ("alpaca", "chat", "raw")
# data.format -> how a prompt is rendered for a model trained on it
STYLE_OF_FORMAT = {"alpaca": "alpaca", "guanaco": "chat", "messages": "chat", "sharegpt": "chat",
                   "prompt_completion": "raw", "text": "raw"}


def prompt_style(data_format: str | None, tokenizer) -> str:
    """The prompt rendering for a model trained on `data_format`. Unknown (a base model, an
    adapter without its run): the chat template when the tokenizer has one, else raw."""
    if data_format in STYLE_OF_FORMAT:
        return STYLE_OF_FORMAT[data_format]
    return "chat" if getattr(tokenizer, "chat_template", None) else "raw"


def render_prompt(tokenizer, prompt: str, style: str) -> str:
    """`prompt` as the text training put before an answer, in `style` (see PROMPT_STYLES)."""
    from .data import ALPACA_PROMPT_NO_INPUT, DEFAULT_CHAT_TEMPLATE
    if style == "alpaca":
        return ALPACA_PROMPT_NO_INPUT.format(instruction=prompt)
    if style == "chat":
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 tokenize=False, add_generation_prompt=True)
        # Training's default chat rendering. Its trailing space is left out: in training the
        # answer's first token carries it ("▁Hello"), so a prompt ending in a lone space
        # token would be one the model never saw.
        return DEFAULT_CHAT_TEMPLATE["user"] + prompt + "\n" + DEFAULT_CHAT_TEMPLATE["assistant"].rstrip(" ")
    if style == "raw":
        return prompt
    raise QloraError(f"prompt style: expected one of {', '.join(PROMPT_STYLES)}, got {style!r}")


def encode_prompt(tokenizer, prompt: str, style: str) -> torch.Tensor:
    """Token ids (1, T) of the rendered prompt, with BOS exactly where training had it."""
    from .data import encode_with_bos
    return torch.tensor([encode_with_bos(tokenizer, render_prompt(tokenizer, prompt, style))], dtype=torch.long)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, style: str | None = None, stream: bool = False, seed: int = 0) -> str:
    """Greedy when temperature == 0, else nucleus sampling. Returns only the new text.

    `style`: how the prompt is rendered (PROMPT_STYLES); None = `prompt_style(None, tokenizer)`.
    """
    from transformers import TextStreamer
    ids = encode_prompt(tokenizer, prompt, style or prompt_style(None, tokenizer))
    ids = ids.to(next(model.parameters()).device)
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


def load_resolved(src, device: str | torch.device | None = None):
    """(model, tokenizer) in eval mode for a `resolve.ModelSource`: the adapter on its base
    quantized (and offloaded, see resolve.Placement) exactly as in training, or a full model
    in its own dtype, on `device` (default: CUDA when available)."""
    from .adapter import load_adapter
    from .model import load_model, load_tokenizer, resolve_device
    device = resolve_device(device)
    if src.adapter is None:
        from transformers import AutoModelForCausalLM
        # straight onto the device: a 7B fp16 model is 13.5 GB the host need not hold first
        model = AutoModelForCausalLM.from_pretrained(src.model, dtype="auto", device_map=str(device))
    else:
        q, p = src.quant, src.placement
        model = load_adapter(load_model(src.model, quantization=q.quantization, double_quant=q.double_quant,
                                        compute_dtype=q.compute_dtype, device=device, offload=p.offload,
                                        offload_dir=p.offload_dir, resident_layers=p.resident_layers,
                                        cache_dir=p.cache_dir), src.adapter)
    return model.eval(), load_tokenizer(src.tokenizer)


def load_for_generation(target, *, base: str | None = None, device=None):
    """(model, tokenizer) for a run, checkpoint, adapter or model folder (see resolve.py)."""
    from .resolve import resolve
    return load_resolved(resolve(target, base=base), device)
