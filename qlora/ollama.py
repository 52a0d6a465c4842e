"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE, SYSTEM, stop tokens.

Ollama's TEMPLATE is a Go template over the chat's messages, not the Hugging Face Jinja
template, so it cannot be translated in general. We know three chat layouts (ChatML,
Llama 3, Mistral's [INST]); a layout is used only when the model's own Jinja template,
rendered by transformers on sample conversations, gives exactly the text a Python mirror of
our Go template gives for the same messages (Ollama passes system messages, including the
Modelfile's SYSTEM, in `.Messages`, and all of them joined in `.System`). A default system
prompt the Jinja template inserts when the chat has none becomes the Modelfile's SYSTEM.
Otherwise the Modelfile says so and Ollama falls back to its own choice from the GGUF's
`tokenizer.chat_template`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SAMPLE = [{"role": "system", "content": "You are terse."},
          {"role": "user", "content": "Hi there"},
          {"role": "assistant", "content": "Hello! How can I help?"},
          {"role": "user", "content": "Name a color."}]
CONVERSATIONS = (SAMPLE, SAMPLE[1:], SAMPLE[3:])


def _chatml(msgs: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) \
        + "<|im_start|>assistant\n"


def _llama3(msgs: list[dict]) -> str:
    return "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                   for m in msgs) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _mistral(msgs: list[dict]) -> str:
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    out = ""
    for i, m in enumerate(msgs):
        if m["role"] == "user":
            last = i == len(msgs) - 1
            out += "[INST] " + (system + "\n\n" if system and last else "") + m["content"] + "[/INST]"
        elif m["role"] == "assistant":
            out += " " + m["content"] + "</s>"
    return out


@dataclass(frozen=True)
class ChatLayout:
    name: str
    template: str  # Ollama Go template
    render: Callable[[list[dict]], str]  # what `template` renders for these messages
    stop: tuple[str, ...]  # end-of-turn markers
    system: re.Pattern | None  # finds a default system prompt in a Jinja rendering


LAYOUTS = (
    ChatLayout("ChatML", (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"), _chatml, ("<|im_start|>", "<|im_end|>"),
        re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", re.S)),
    ChatLayout("Llama 3", (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"), _llama3,
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        re.compile(r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S)),
    ChatLayout("Mistral [INST]", (
        "{{- range $i, $m := .Messages }}\n"
        "{{- if eq $m.Role \"user\" }}[INST] "
        "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}"
        "{{ $m.Content }}[/INST]\n"
        "{{- else if eq $m.Role \"assistant\" }} {{ $m.Content }}</s>\n"
        "{{- end }}\n"
        "{{- end }}"), _mistral, ("[INST]", "[/INST]"), None),
)


@dataclass
class ChatMatch:
    layout: ChatLayout | None  # None: no known layout renders like the model's template
    system: str | None  # the template's default system prompt
    reason: str  # what the Modelfile comment says


def match_chat_template(tokenizer, add_bos: bool) -> ChatMatch:
    """Which known layout the tokenizer's Jinja chat template renders exactly (see module doc)."""
    if not getattr(tokenizer, "chat_template", None):
        return ChatMatch(None, None, "the tokenizer has no chat template: prompts are sent as written")

    def jinja(msgs):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token or ""
        # A tokenizer that adds BOS itself (and llama.cpp, told so by the GGUF) supplies it.
        return text[len(bos):] if add_bos and bos and text.startswith(bos) else text

    try:
        rendered = [jinja(c) for c in CONVERSATIONS]
    except Exception as e:  # templates raise anything on chats they refuse
        return ChatMatch(None, None, f"the chat template failed on a sample chat ({type(e).__name__})")
    for layout in LAYOUTS:
        if layout.render(CONVERSATIONS[0]) != rendered[0]:
            continue
        system = None
        if layout.render(CONVERSATIONS[1]) != rendered[1] and layout.system is not None:
            m = layout.system.match(rendered[1])
            system = m.group(1) if m else None
        sys_msgs = [{"role": "system", "content": system}] if system else []
        if all(layout.render(sys_msgs + c) == r for c, r in zip(CONVERSATIONS[1:], rendered[1:])):
            return ChatMatch(layout, system, f"{layout.name}, checked against the model's chat template")
    return ChatMatch(None, None, "the chat template matches none of ChatML, Llama 3 or Mistral "
                                 "[INST] exactly; Ollama picks a template from the GGUF's "
                                 "tokenizer.chat_template itself")


def ollama_name(stem: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"


def modelfile_text(gguf_path: Path, modelfile_path: Path, chat: ChatMatch, stops: list[str],
                   what: str) -> str:
    """The Modelfile for `gguf_path` (FROM relative to the Modelfile's folder)."""
    name = ollama_name(gguf_path.stem)
    lines = [f"# Ollama Modelfile for {gguf_path.name} ({what}), written by qlora export.",
             "# Create and run it with:",
             f"#   ollama create {name} -f {modelfile_path.resolve()}",
             f"#   ollama run {name}",
             f"# Chat template: {chat.reason}.",
             f"FROM ./{gguf_path.name}"]
    if chat.layout is not None:
        lines.append(f'TEMPLATE """{chat.layout.template}"""')
    if chat.system and '"""' not in chat.system:
        lines.append(f'SYSTEM """{chat.system}"""')
    markers = list(chat.layout.stop) if chat.layout else []
    for s in dict.fromkeys(markers + stops):
        if s and '"' not in s:
            lines.append(f'PARAMETER stop "{s}"')
    return "\n".join(lines) + "\n"
