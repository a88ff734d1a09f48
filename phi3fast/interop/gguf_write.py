"""Write a Phi-3-layout model as a llama.cpp GGUF file, in the phi3 layout or (for a converted Llama) the llama one.

- phi3: attn_qkv and ffn_up stay fused (llama.cpp's phi3 graph splits them, gate first) and RoPE rows keep
  transformers' rotate-half order (the phi3 graph uses it). The output matrix is always written.
- llama: q/k/v and gate/up are split back, and attn_q/attn_k rows are permuted to the interleaved order llama.cpp's
  llama graph rotates (gguf_read.permute_rope); a tied output matrix is left out, as llama.cpp expects.
- Types: 1-D tensors (norms) are F32. Matrices are F16, or Q8_0 / Q4_0 blocks of 32 along each row (the gguf
  package's numpy codecs); a matrix whose rows do not split into 32-blocks stays F16, as llama.cpp does.
- Tokenizer metadata: a byte-level BPE tokenizer.json is written as tokenizer.ggml.model "gpt2" (tokens,
  token_type, merges), with bos/eos/pad ids, add_bos_token, the chat template and the end-of-turn token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from phi3fast.errors import Phi3FastError
from phi3fast.interop.gguf_dep import require_gguf
from phi3fast.interop.gguf_read import permute_rope

TYPES = ("f16", "q8_0", "q4_0")
_BLOCK = 32  # elements per Q8_0 / Q4_0 block
# llama.cpp's token types.
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def _tensor_names(arch: str, layers: int) -> dict[str, str]:
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        names |= {
            f"{p}.input_layernorm.weight": f"{b}.attn_norm.weight",
            f"{p}.post_attention_layernorm.weight": f"{b}.ffn_norm.weight",
            f"{p}.self_attn.o_proj.weight": f"{b}.attn_output.weight",
            f"{p}.mlp.down_proj.weight": f"{b}.ffn_down.weight",
            f"{p}.self_attn.qkv_proj.weight": f"{b}.attn_qkv.weight",
            f"{p}.mlp.gate_up_proj.weight": f"{b}.ffn_up.weight",
        }
    return names


def gguf_tensors(
    tensors: Iterator[tuple[str, Tensor]], config: dict[str, Any], arch: str
) -> Iterator[tuple[str, Tensor]]:
    """GGUF-named fp32 tensors in `arch` layout from transformers-named Phi-3 tensors."""
    names = _tensor_names(arch, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config["hidden_size"] // heads
    tied = bool(config.get("tie_word_embeddings"))
    for key, t in tensors:
        t = t.float()
        name = names[key]
        if arch == "llama" and name.endswith("attn_qkv.weight"):
            q, k, v = t.split([heads * head_dim, kv * head_dim, kv * head_dim])
            base = name.removesuffix("attn_qkv.weight")
            yield base + "attn_q.weight", permute_rope(q, heads)
            yield base + "attn_k.weight", permute_rope(k, kv)
            yield base + "attn_v.weight", v
        elif arch == "llama" and name.endswith("ffn_up.weight"):
            gate, up = t.chunk(2)
            base = name.removesuffix("ffn_up.weight")
            yield base + "ffn_gate.weight", gate
            yield base + "ffn_up.weight", up
        else:
            yield name, t
            # llama.cpp's phi3 graph requires an output matrix even when the embeddings are tied.
            if key == "model.embed_tokens.weight" and tied and arch == "phi3":
                yield "output.weight", t


def _encode(t: Tensor, qtype: str, gguf: Any) -> tuple[np.ndarray, Any]:
    arr = t.detach().cpu().numpy().astype(np.float32)
    Q = gguf.GGMLQuantizationType
    if arr.ndim == 1:
        return arr, Q.F32
    if qtype == "f16" or arr.shape[-1] % _BLOCK:
        return arr.astype(np.float16), Q.F16
    target = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    return gguf.quants.quantize(arr, target), target


def dequantized(t: Tensor, qtype: str) -> Tensor:
    """What a reader of the GGUF gets back for `t` written as `qtype` (the oracle for round-trip tolerances)."""
    gguf = require_gguf("writing a GGUF file")
    arr, ttype = _encode(t, qtype, gguf)
    return torch.from_numpy(np.array(gguf.quants.dequantize(arr, ttype), dtype=np.float32)).reshape(t.shape)


def tokenizer_metadata(model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer.* keys for the checkpoint's tokenizer.json (byte-level BPE only)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise Phi3FastError(f"{path}: missing (GGUF export writes the tokenizer from tokenizer.json)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    pre = json.dumps(tj.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise Phi3FastError(
            f"{path}: GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2'); this one is "
            f"{model.get('type')} with pre-tokenizer {((tj.get('pre_tokenizer') or {}).get('type'))}"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    vocab.update({c: t["id"] for c, t in added.items()})
    size = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [_UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = _NORMAL
        if text in added:
            types[i] = _CONTROL if added[text].get("special") else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tc_path = model_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        # llama.cpp picks its pre-tokenizer regex by name; a GGUF-converted model keeps its own.
        "tokenizer.ggml.pre": config.get("phi3fast_gguf_tokenizer_pre") or "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(tc.get("add_bos_token", False)),
    }
    eos = config.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos]
    for key, value in (
        ("bos_token_id", config.get("bos_token_id")),
        ("eos_token_id", eos_ids[0]),
        ("padding_token_id", config.get("pad_token_id")),
    ):
        if value is not None:
            meta[f"tokenizer.ggml.{key}"] = int(value)
    if len(eos_ids) > 1 and eos_ids[1] is not None:
        meta["tokenizer.ggml.eot_token_id"] = int(eos_ids[1])
    return meta


def write_gguf(
    out: Path,
    tensors: Iterator[tuple[str, Tensor]],
    config: dict[str, Any],
    arch: str,
    qtype: str,
    metadata: dict[str, Any],
    name: str,
) -> None:
    """Write the GGUF file at `out` (the caller makes it atomic). Tensors are encoded one at a time."""
    gguf = require_gguf("writing a GGUF file")
    w = gguf.GGUFWriter(str(out), arch)
    heads = config["num_attention_heads"]
    w.add_name(name)
    w.add_file_type({"f16": 1, "q8_0": 7, "q4_0": 2}[qtype])  # llama.cpp's MOSTLY_* file types
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(config.get("num_key_value_heads") or heads)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_rope_dimension_count(config["hidden_size"] // heads)
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_vocab_size(config["vocab_size"])
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(config.get("original_max_position_embeddings") or 4096)
        if config.get("sliding_window"):
            w.add_sliding_window(int(config["sliding_window"]))
    for key, value in metadata.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list) and value and isinstance(value[0], int):
            w.add_array(key, value)
        else:
            w.add_array(key, list(value))
    for tname, t in gguf_tensors(tensors, config, arch):
        arr, ttype = _encode(t, qtype, gguf)
        w.add_tensor(tname, arr, raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
