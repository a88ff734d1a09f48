"""Phi-3's chat format: the template, the tokenizer that carries it, message checks and the stop tokens.

A checkpoint's own tokenizer_config.json template wins; PHI3_CHAT_TEMPLATE is set only when the files have none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi3fast.errors import Phi3FastError

if TYPE_CHECKING:
    from phi3fast.model.phi3 import Phi3ForCausalLM

# Phi-3(.5)-mini-instruct's chat template, in substance: each turn is <|role|>\n content <|end|>\n; a generation
# prompt opens the assistant turn. Unknown roles are an error rather than silently dropped.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

ROLES = ("system", "user", "assistant")


def check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise Phi3FastError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise Phi3FastError(f"messages[{i}]: needs 'role' in {ROLES} and a string 'content', got {m!r}")
    return messages


def stop_ids(model: Phi3ForCausalLM) -> set[int]:
    """<|end|>, the tokenizer's eos and every eos id in generation_config.json / config."""
    tok = model.tokenizer
    ids: set[int] = set()
    end = tok.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tok.unk_token_id:
        ids.add(end)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    eos = model.config.eos_token_id
    ids.update([eos] if isinstance(eos, int) else list(eos or ()))
    gen = model.model_dir / "generation_config.json" if model.model_dir is not None else None
    if gen is not None and gen.is_file():
        try:
            g = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Phi3FastError(f"{gen}: not valid JSON ({e})") from None
        ids.update([g] if isinstance(g, int) else list(g or ()))
    return ids


def load_tokenizer(root: Path) -> Any:
    """The checkpoint's transformers tokenizer; Phi-3's chat template is set if the files lack one."""
    if not any((root / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise Phi3FastError(f"{root}: no tokenizer files (tokenizer.json or tokenizer.model)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(root))
    except Exception as e:
        files = [f for f in TOKENIZER_FILES if (root / f).is_file()]
        first = (str(e).strip().splitlines() or [""])[0]
        raise Phi3FastError(
            f"{root}: cannot load the tokenizer from {', '.join(files)} ({type(e).__name__}: {first})"
        ) from None
    if not getattr(tok, "chat_template", None):
        tok.chat_template = PHI3_CHAT_TEMPLATE
    return tok


def chat_prompt_ids(model: Phi3ForCausalLM, messages: list[dict[str, str]]) -> list[int]:
    """Phi-3's chat template with the assistant turn opened; the template supplies every special token."""
    text = model.tokenizer.apply_chat_template(
        check_messages(messages), tokenize=False, add_generation_prompt=True
    )
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
