"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE (Go text/template), SYSTEM, PARAMETER stop.

The TEMPLATE is built from the checkpoint's chat template through its turn structure (chat_turns): each message
is written as prefix + content + suffix of its role, and after the last message, unless it is the assistant's,
the generation prompt. The template's BOS text is left out because llama.cpp adds BOS itself when the GGUF says
so. A default system message becomes the SYSTEM line (Ollama inserts it when a request has none). One `PARAMETER
stop` per stop text: the assistant's end-of-turn marker and the eos token(s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi3fast.errors import Phi3FastError
from phi3fast.model.chat_turns import ChatTurns, chat_turns, end_of_turn


def _literal(text: str) -> str:
    """Go template literal text: only the action delimiter needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(turns: ChatTurns) -> str:
    """Ollama's Go-template form of the turn structure (same text as the Jinja template, BOS aside)."""
    branches = []
    for i, role in enumerate(("system", "user", "assistant")):
        keyword = "if" if i == 0 else "else if"
        body = f"{_literal(turns.prefix[role])}{{{{ .Content }}}}"
        if role == "assistant":
            # A final assistant message is a prefill: the model continues it, so it is not closed.
            body += f"{{{{ if not $last }}}}{_literal(turns.suffix[role])}{{{{ end }}}}"
        else:
            body += _literal(turns.suffix[role])
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{body}')
    return (
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        + "".join(branches)
        + "{{ end }}"
        + f'{{{{- if and $last (ne .Role "assistant") }}}}{_literal(turns.generation_prompt)}{{{{ end }}}}'
        + "{{- end }}"
    )


def stop_texts(tok: Any, turns: ChatTurns, eos_ids: list[int]) -> list[str]:
    stops = [end_of_turn(tok, turns)]
    stops += [tok.convert_ids_to_tokens(int(i)) for i in eos_ids]
    return [s for i, s in enumerate(stops) if s and s not in stops[:i]]


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise Phi3FastError(f'the {what} contains \'"""\', which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_name: str, tok: Any, eos_ids: list[int]) -> str:
    """The Modelfile text for the GGUF file `gguf_name` (a path relative to the Modelfile's folder)."""
    turns = chat_turns(tok)
    source = gguf_name if gguf_name.startswith((".", "/")) else f"./{gguf_name}"
    lines = [f"FROM {source}", f"TEMPLATE {_quoted(go_template(turns), 'chat template')}"]
    if turns.default_system:
        lines.append(f"SYSTEM {_quoted(turns.default_system, 'default system message')}")
    for stop in stop_texts(tok, turns, eos_ids):
        lines.append(
            f"PARAMETER stop {_quoted(stop, 'stop token') if any(c.isspace() for c in stop) else stop}"
        )
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir: Path, gguf_file: Path, tok: Any, eos_ids: list[int]) -> Path:
    """Write out_dir/Modelfile (atomically) next to a link or copy of the GGUF it names."""
    import os
    import tempfile

    out_dir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(gguf_file, out_dir)
    text = modelfile(rel, tok, eos_ids)
    fd, tmp = tempfile.mkstemp(prefix=".Modelfile.", dir=out_dir)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out_dir / "Modelfile")
    return out_dir / "Modelfile"
