"""`phi3fast merge`: fold a LoRA adapter into its base and write a plain transformers Phi-3 checkpoint.

Merged W = dequant(NF4 base) + (alpha / r) * B @ A, computed in fp32, then cast to the output dtype. The base is
the one the adapter was trained on: with quantize='nf4' (QLoRA, the default) the NF4 weights, NOT the original
16-bit ones; the adapter learned to correct the quantized model, and merging it into the unquantized weights is a
known source of broken merged models. With quantize=None (plain LoRA) the dense base. Embeddings, norms and
lm_head are copied from the base checkpoint. The output (sharded safetensors + index when large, config.json
without quantization_config, tokenizer files, generation_config.json) is written to a temp dir, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from phi3fast._utils import atomic_dir, check_new_dir
from phi3fast.kernels.backend import DTYPES
from phi3fast.model.loading import BNB_SUFFIXES, load, weight_files

# Files copied verbatim from the base checkpoint (tokenizer and generation settings).
COPIED = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
MAX_SHARD_BYTES = 2 * 1024**3
# config.json names dtypes as torch does ("bfloat16").
_BY_TORCH_NAME = {str(d).removeprefix("torch."): d for d in DTYPES.values()}


def _base_dtype(raw: dict) -> torch.dtype:
    """The dtype the base checkpoint was published in (bf16 for Phi-3); a bnb-4bit base uses its compute dtype."""
    q = raw.get("quantization_config") or {}
    name = q.get("bnb_4bit_compute_dtype") if q else None
    name = name or raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    return _BY_TORCH_NAME.get(str(name).removeprefix("torch."), torch.bfloat16)


def merge_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    quantize: str | None = "nf4",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write base + adapter as one transformers checkpoint in out_dir (atomically); returns out_dir."""
    out = Path(out_dir)
    check_new_dir(out)  # before the (slow) load
    # fp32 compute so the delta is added before any rounding to the output dtype.
    # On CUDA when there is one (quantizing and dequantizing a real Phi-3 is much faster there); tensors are
    # moved to the host one at a time for writing.
    model = load(model_dir, adapter=adapter_dir, dtype=torch.float32, quantize=quantize)
    root = model.model_dir
    assert root is not None
    raw = json.loads((root / "config.json").read_text(encoding="utf-8"))
    dtype = dtype or _base_dtype(raw)

    linears = model.linears()

    def merged() -> Iterator[tuple[str, Tensor]]:
        # One tensor at a time, so peak memory is the NF4 model plus one shard, not the merged model.
        for name, lin in tqdm(linears.items(), desc="merging", unit="linear", disable=None, leave=False):
            w = lin.dense_weight(torch.float32)
            if lin.lora_A is not None:
                w = w + lin.lora_scale * (lin.lora_B.detach().float() @ lin.lora_A.detach().float())
            yield f"model.{name}.weight", w.to(dtype).cpu()
        for name, p in model.named_parameters():
            if name.rpartition(".")[0] in linears or (
                name == "lm_head.weight" and raw.get("tie_word_embeddings")
            ):
                continue  # base/LoRA weights of the projections (merged above); a tied lm_head is not stored
            yield (name if name.startswith("lm_head.") else f"model.{name}"), p.detach().to(dtype).cpu()

    with atomic_dir(out) as tmp:
        written = _write_shards(merged(), tmp, MAX_SHARD_BYTES)
        expected = {k for k in weight_files(root) if not k.endswith(tuple(f".{x}" for x in BNB_SUFFIXES))}
        if written != expected:  # internal invariant: the same tensor names as the base checkpoint
            raise AssertionError(f"merged tensors differ from the base: {sorted(written ^ expected)[:5]}")
        raw.pop("quantization_config", None)
        raw["torch_dtype"] = str(dtype).removeprefix("torch.")
        raw.pop("dtype", None)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for name in COPIED:
            if (root / name).is_file():
                shutil.copyfile(root / name, tmp / name)
    return out


def _write_shards(
    tensors: Iterator[tuple[str, Tensor]], out: Path, max_bytes: int = MAX_SHARD_BYTES
) -> set[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index past max_bytes (transformers' names).
    Holds one shard in memory at a time; returns the keys written."""
    from safetensors.torch import save_file

    parts: list[tuple[Path, list[str]]] = []
    shard: dict[str, Tensor] = {}
    size = total = 0

    def flush() -> None:
        part = out / f".part-{len(parts)}.safetensors"
        save_file(shard, str(part), metadata={"format": "pt"})
        parts.append((part, list(shard)))
        shard.clear()

    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_bytes:
            flush()
            size = 0
        shard[key] = t.contiguous()
        size += nbytes
        total += nbytes
    if shard:
        flush()
    if len(parts) == 1:
        os.replace(parts[0][0], out / "model.safetensors")
        return set(parts[0][1])
    weight_map = {}
    for i, (part, keys) in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(part, out / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return set(weight_map)
