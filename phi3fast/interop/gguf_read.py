"""Read a llama.cpp GGUF file (llama or phi3 architecture) as transformers-named fp32 tensors plus a config.

Facts of the format this relies on (GGUF spec, llama.cpp's converter):
- A tensor's `shape` lists ggml dimensions innermost first, so a [out, in] matrix is stored as (in, out).
- Quantized blocks (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized with the gguf package's numpy codecs.
- llama.cpp's llama graph applies RoPE to interleaved pairs (x0, x1), (x2, x3), ..., while transformers rotates
  the two halves of each head. Its converter therefore permutes the rows of attn_q / attn_k within each head,
  from (half, i) to (i, half) order; reading them back undoes that (`unpermute_rope`). phi3's graph uses the
  halves layout (NEOX), so a phi3 file's fused attn_qkv is stored as transformers has it.
- phi3's ffn_up holds [gate; up] fused, as transformers' gate_up_proj.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from phi3fast.errors import Phi3FastError
from phi3fast.interop.gguf_dep import require_gguf

ARCHS = ("llama", "phi3")
_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_COMMON = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_ARCH = {
    "llama": {
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
    },
    "phi3": {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"},
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def unpermute_rope(w: Tensor, n_head: int) -> Tensor:
    """llama.cpp's interleaved-RoPE row order of a q/k projection back to transformers' rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope(w: Tensor, n_head: int) -> Tensor:
    """transformers' rotate-half row order of a q/k projection to llama.cpp's interleaved order."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class GGUFModel:
    """A GGUF file opened for reading: its metadata as a Llama-style config and its tensors by transformers name."""

    path: Path
    arch: str
    config: dict[str, Any]
    generation: dict[str, Any]
    names: dict[str, str] = field(default_factory=dict)  # transformers name -> GGUF tensor name
    reader: Any = None
    tokenizer_pre: str | None = None

    def get(self, key: str) -> Tensor:
        gguf = require_gguf("reading a GGUF file")
        t = self._tensors[self.names[key]]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise Phi3FastError(
                f"{self.path}: tensor '{t.name}' is {t.tensor_type.name}, which the gguf package cannot dequantize"
            ) from None
        shape = tuple(int(d) for d in reversed(t.shape))
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
        if self.arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config["num_attention_heads"]
            if key.endswith("k_proj.weight"):
                heads = self.config["num_key_value_heads"]
            w = unpermute_rope(w, heads)
        return w

    def __post_init__(self) -> None:
        self._tensors = {t.name: t for t in self.reader.tensors} if self.reader is not None else {}


def _contents(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def open_gguf(path: str | Path) -> GGUFModel:
    """Open `path` and map its metadata and tensor names; every unsupported part is one Phi3FastError."""
    gguf = require_gguf("reading a GGUF file")
    path = Path(path)
    if not path.is_file():
        raise Phi3FastError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise Phi3FastError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _contents(reader, "general.architecture")
    if arch not in ARCHS:
        raise Phi3FastError(
            f"{path}: GGUF architecture {arch!r} does not map to Phi-3; convert reads {' and '.join(ARCHS)}"
        )

    def need(key: str) -> Any:
        value = _contents(reader, f"{arch}.{key}")
        if value is None:
            raise Phi3FastError(f"{path}: GGUF metadata '{arch}.{key}' is missing")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(_contents(reader, f"{arch}.attention.head_count_kv", heads))
    rope_dim = _contents(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != hidden // heads:
        raise Phi3FastError(
            f"{path}: RoPE on {rope_dim} of {hidden // heads} head dimensions (partial rotary) does not map"
        )
    scaling = _contents(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise Phi3FastError(f"{path}: RoPE scaling {scaling!r} has no Phi-3 form")

    names: dict[str, str] = {}
    layer_map = {**_LAYER_COMMON, **_LAYER_ARCH[arch]}
    tensors = {t.name: t for t in reader.tensors}
    for name in tensors:
        m = _BLK.match(name)
        if name in _TOP:
            names[_TOP[name]] = name
        elif m and m.group(2) in layer_map:
            names[f"model.layers.{m.group(1)}.{layer_map[m.group(2)]}"] = name
        elif name in ("rope_factors_long.weight", "rope_factors_short.weight") and arch == "phi3":
            continue
        elif name.endswith(".bias"):
            raise Phi3FastError(f"{path}: tensor '{name}' is a bias, which Phi-3's layers do not have")
        elif "exps" in name or "ffn_gate_inp" in name:
            raise Phi3FastError(
                f"{path}: tensor '{name}' belongs to a mixture-of-experts layer (no Phi-3 form)"
            )
        elif name == "rope_freqs.weight":
            raise Phi3FastError(f"{path}: per-frequency RoPE factors (llama3 scaling) have no Phi-3 form")
        else:
            raise Phi3FastError(f"{path}: unexpected GGUF tensor '{name}' for architecture {arch}")
    if "token_embd.weight" not in tensors:
        raise Phi3FastError(f"{path}: GGUF tensor 'token_embd.weight' is missing")
    vocab = int(tensors["token_embd.weight"].shape[1])

    bos = _contents(reader, "tokenizer.ggml.bos_token_id")
    eos = _contents(reader, "tokenizer.ggml.eos_token_id")
    pad = _contents(reader, "tokenizer.ggml.padding_token_id")
    config: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": int(_contents(reader, f"{arch}.context_length", 4096)),
        "rope_theta": float(_contents(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    # Chat models end a turn with an end-of-turn token that may differ from eos: generation stops at both.
    stops = [i for i in (eos, _contents(reader, "tokenizer.ggml.eot_token_id")) if i is not None]
    generation = {"bos_token_id": bos, "eos_token_id": sorted(set(stops)) if len(set(stops)) > 1 else eos}
    if pad is not None:
        generation["pad_token_id"] = pad
    if arch == "phi3":
        window = _contents(reader, "phi3.attention.sliding_window")
        config["sliding_window"] = int(window) if window else None
        if "rope_factors_long.weight" in tensors:
            raise Phi3FastError(
                f"{path}: LongRoPE phi3 GGUF files are not supported yet (4k-context phi3 are)"
            )
    pre = _contents(reader, "tokenizer.ggml.pre")
    return GGUFModel(path, arch, config, generation, names, reader, pre)


def write_tokenizer(model: GGUFModel, out: Path) -> None:
    """The GGUF's tokenizer and chat template as transformers tokenizer files in `out` (transformers' converter)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model.path.parent), gguf_file=model.path.name)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise Phi3FastError(
            f"{model.path}: cannot build a tokenizer from its GGUF metadata ({first})"
        ) from None
    template = _contents(model.reader, "tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    tok.save_pretrained(str(out))
