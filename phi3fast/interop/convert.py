"""`phi3fast convert`: a Llama-architecture transformers checkpoint or a GGUF file → a Phi-3-layout checkpoint.

The output is an ordinary transformers Phi-3 checkpoint (safetensors, config.json, tokenizer files with the
source's chat template, generation_config.json with its eos ids) that phi3fast and transformers'
Phi3ForCausalLM both load. Its config records the source architecture (llama.SOURCE_ARCH_KEY) for `export`.
Tensors stream one at a time (a shard in memory at most); the directory is written to a temp dir, then renamed.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

from phi3fast._utils import atomic_dir, check_new_dir
from phi3fast.errors import Phi3FastError
from phi3fast.interop.llama import check_llama_config, phi3_config, phi3_tensors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TORCH_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Tokenizer and generation files kept verbatim from a transformers source.
KEPT_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def convert(src: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Convert `src` (checkpoint dir, Hub id or .gguf file) into a Phi-3 checkpoint at out_dir; returns out_dir.

    dtype: 'fp32', 'bf16' or 'fp16'; None keeps the source's (fp32 for a GGUF, whose blocks are dequantized)."""
    if dtype is not None and dtype not in DTYPES:
        raise Phi3FastError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    check_new_dir(out)
    src_path = Path(src).expanduser()
    is_gguf = src_path.suffix.lower() == ".gguf" or (src_path.is_file() and _gguf_magic(src_path))
    with atomic_dir(out) as tmp:
        if is_gguf:
            _from_gguf(src_path, tmp, dtype)
        else:
            _from_transformers(src, tmp, dtype)
        for f in tmp.iterdir():
            f.chmod(0o644)  # files copied from a read-only cache keep their mode otherwise
    return out


def _gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _write(config: dict, tensors, tmp: Path) -> None:  # noqa: ANN001
    from phi3fast.lora.merge import _write_shards

    _write_shards(tensors, tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _from_transformers(src: str | Path, tmp: Path, dtype: str | None) -> None:
    from safetensors import safe_open

    from phi3fast.model.config import read_config_json
    from phi3fast.model.loading import resolve_model_dir, weight_files

    root = resolve_model_dir(src)
    cfg_path = root / "config.json"
    raw = read_config_json(cfg_path, "a transformers checkpoint")
    if raw.get("model_type") == "phi3":
        raise Phi3FastError(f"{root}: already a Phi-3 checkpoint; use it as it is")
    check_llama_config(raw, str(cfg_path))
    if raw.get("quantization_config"):
        raise Phi3FastError(f"{cfg_path}: a quantized checkpoint; convert reads 16/32-bit Llama weights")
    src_dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32").removeprefix("torch.")
    target = DTYPES[dtype] if dtype else getattr(torch, src_dtype, torch.float32)
    files = weight_files(root)
    config = phi3_config(raw, "llama", _TORCH_NAMES.get(target, "float32"))
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def get(key: str) -> torch.Tensor:
            file = files[key]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            return handles[file].get_tensor(key)  # type: ignore[attr-defined]

        tensors = phi3_tensors(
            files, get, raw["num_hidden_layers"], config["tie_word_embeddings"], str(root), target
        )
        _write(config, tensors, tmp)
    for name in KEPT_FILES:
        if (root / name).is_file():
            shutil.copyfile(root / name, tmp / name)


def _from_gguf(path: Path, tmp: Path, dtype: str | None) -> None:
    from phi3fast.interop.gguf_read import open_gguf, write_tokenizer

    model = open_gguf(path)
    check_llama_config(model.config, str(path))
    target = DTYPES[dtype or "fp32"]
    config = phi3_config(model.config, model.arch, _TORCH_NAMES[target])
    if model.arch == "phi3":
        config["sliding_window"] = model.config.get("sliding_window")
    if model.tokenizer_pre:  # llama.cpp's pre-tokenizer name, kept for export
        config["phi3fast_gguf_tokenizer_pre"] = model.tokenizer_pre
    tensors = phi3_tensors(
        model.names,
        model.get,
        model.config["num_hidden_layers"],
        config["tie_word_embeddings"],
        str(path),
        target,
    )
    _write(config, tensors, tmp)
    write_tokenizer(model, tmp)
    (tmp / "generation_config.json").write_text(json.dumps(model.generation, indent=2) + "\n")
