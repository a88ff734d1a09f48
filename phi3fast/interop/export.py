"""`phi3fast export`: a Phi-3 checkpoint (plus an adapter) as one GGUF file for llama.cpp and Ollama.

With an adapter, the exported weights are `phi3fast merge`'s: the adapter folded, in fp32, into the dequantized
NF4 base it was trained on. Without one, the checkpoint's own weights. The GGUF layout is phi3, or llama for a
checkpoint `convert` made from a Llama (its config records the source architecture), so llama.cpp runs the graph
the model was trained in. Every argument is checked before any weight is read; the file is written to a temp
name beside the target and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

from phi3fast.errors import Phi3FastError
from phi3fast.interop.gguf_dep import require_gguf
from phi3fast.interop.gguf_write import TYPES, tokenizer_metadata, write_gguf
from phi3fast.interop.llama import SOURCE_ARCH_KEY


def _check_args(out: Path, qtype: str, ollama_dir: Path | None) -> None:
    if qtype not in TYPES:
        raise Phi3FastError(f"type must be one of {', '.join(TYPES)}, got {qtype!r}")
    if out.suffix.lower() != ".gguf":
        raise Phi3FastError(f"{out}: the output file must end in .gguf")
    if out.is_dir():
        raise Phi3FastError(f"{out}: is a directory")
    if not out.parent.is_dir():
        raise Phi3FastError(f"{out.parent}: no such directory (for the output file)")
    if not os.access(out.parent, os.W_OK):
        raise Phi3FastError(f"{out.parent}: not writable")
    if ollama_dir is not None and ollama_dir.exists() and not ollama_dir.is_dir():
        raise Phi3FastError(f"{ollama_dir}: exists and is not a directory (for the Modelfile)")


def _tensors(root: Path, stack: ExitStack) -> Iterator[tuple[str, Tensor]]:
    from safetensors import safe_open

    from phi3fast.model.loading import weight_files

    handles: dict[Path, object] = {}
    for key, file in weight_files(root).items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
        yield key, handles[file].get_tensor(key)  # type: ignore[attr-defined]


def export_gguf(
    model_dir: str | Path,
    out_file: str | Path,
    *,
    adapter: str | Path | None = None,
    qtype: str = "f16",
    ollama_dir: str | Path | None = None,
) -> Path:
    """Write the (merged) model as a GGUF at out_file, and a Modelfile in ollama_dir if given; returns out_file."""
    out = Path(out_file).expanduser()
    ollama = Path(ollama_dir).expanduser() if ollama_dir is not None else None
    _check_args(out, qtype, ollama)
    require_gguf("writing a GGUF file")
    from phi3fast.model.chat import load_tokenizer
    from phi3fast.model.config import load_config
    from phi3fast.model.loading import resolve_model_dir

    root = resolve_model_dir(model_dir)
    load_config(root / "config.json")  # a Phi-3 checkpoint phi3fast loads, checked before any work
    if adapter is not None:
        adapter_dir = resolve_model_dir(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise Phi3FastError(f"{adapter_dir}: not a PEFT adapter (no adapter_config.json)")
    raw = json.loads((root / "config.json").read_text(encoding="utf-8"))
    arch = raw.get(SOURCE_ARCH_KEY) or "phi3"
    meta = tokenizer_metadata(root, raw)
    tok = load_tokenizer(root)
    if getattr(tok, "chat_template", None):
        meta["tokenizer.chat_template"] = tok.chat_template

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        source = root
        if adapter is not None:
            from phi3fast.lora.merge import merge_adapter

            source = merge_adapter(root, adapter, tmp_dir / "merged", dtype=torch.float32)
        tmp_file = tmp_dir / out.name
        with ExitStack() as stack:
            write_gguf(tmp_file, _tensors(source, stack), raw, arch, qtype, meta, name=root.name)
        os.chmod(tmp_file, 0o644)
        os.replace(tmp_file, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if ollama is not None:
        from phi3fast.interop.ollama import write_modelfile

        eos = raw.get("eos_token_id")
        gen = root / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id", eos)
        eos_ids = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
        write_modelfile(ollama, out, tok, eos_ids)
    return out
