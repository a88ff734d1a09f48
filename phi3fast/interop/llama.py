"""Llama → Phi-3: the config and the tensor mapping.

A Llama decoder layer is a Phi-3 decoder layer with its projections split: Phi-3's `qkv_proj` is the row-wise
concatenation [q_proj; k_proj; v_proj] and `gate_up_proj` is [gate_proj; up_proj] (transformers' Phi-3 splits
them back in that order). Both use RMSNorm before attention and MLP, SiLU-gated MLPs and the same rotate-half
RoPE, so fusing the weights gives the same function. What does not map, and is refused with one line: biases
on q/k/v/o or on the MLP, mixture-of-experts layers, activations other than SiLU, a head_dim other than
hidden/heads, and RoPE scaling Phi-3 has no form for (llama3, linear, dynamic, yarn).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from phi3fast.errors import Phi3FastError

# config.json key recording the architecture a converted checkpoint came from ("llama" or "phi3"): export
# writes a GGUF of that architecture, so llama.cpp runs a converted Llama with its own Llama graph.
SOURCE_ARCH_KEY = "phi3fast_source_architecture"

_ATTN = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj")
# Per-layer tensors of the Phi-3 layout, in the order they are written.
PHI3_LAYER_KEYS = (
    "self_attn.qkv_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
_LLAMA_LAYER_KEYS = (
    *(f"self_attn.{p}.weight" for p in _ATTN),
    "self_attn.o_proj.weight",
    *(f"mlp.{p}.weight" for p in _MLP),
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def check_llama_config(raw: dict[str, Any], where: str) -> None:
    """Refuse, in one line, a Llama-family config whose layers have no Phi-3 form."""
    model_type = raw.get("model_type")
    arch = raw.get("architectures")
    if raw.get("num_local_experts") or raw.get("num_experts") or "moe" in str(model_type).lower():
        raise Phi3FastError(f"{where}: a mixture-of-experts model ({model_type}) does not map to Phi-3")
    if model_type != "llama":
        raise Phi3FastError(
            f"{where}: model_type {model_type!r} (architectures {arch}) does not map to Phi-3; "
            f"convert reads Llama-architecture checkpoints (model_type 'llama') and GGUF files"
        )
    if raw.get("attention_bias"):
        raise Phi3FastError(f"{where}: attention_bias is true: biases in q/k/v/o do not map to Phi-3")
    if raw.get("mlp_bias"):
        raise Phi3FastError(f"{where}: mlp_bias is true: MLP biases do not map to Phi-3")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise Phi3FastError(f"{where}: hidden_act {act!r} does not map to Phi-3's SiLU MLP")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise Phi3FastError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or hidden // heads
    if hidden % heads or head_dim != hidden // heads:
        raise Phi3FastError(
            f"{where}: head_dim {head_dim} is not hidden_size / num_attention_heads ({hidden}/{heads}); "
            f"Phi-3 has no separate head_dim"
        )
    # transformers 4.x writes "rope_scaling", 5.x "rope_parameters" (with rope_theta inside).
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise Phi3FastError(f"{where}: RoPE scaling {rope_type!r} has no Phi-3 form (default or longrope)")


def phi3_config(raw: dict[str, Any], source_arch: str, dtype: str) -> dict[str, Any]:
    """The Phi-3 config.json for a checked Llama config (`raw`), keeping its token ids and context."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    max_pos = int(raw.get("max_position_embeddings") or 4096)
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": raw["vocab_size"],
        "hidden_size": raw["hidden_size"],
        "intermediate_size": raw["intermediate_size"],
        "num_hidden_layers": raw["num_hidden_layers"],
        "num_attention_heads": raw["num_attention_heads"],
        "num_key_value_heads": raw.get("num_key_value_heads") or raw["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "original_max_position_embeddings": max_pos,
        "rope_theta": theta,
        "rope_scaling": None,
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "sliding_window": None,
        "initializer_range": float(raw.get("initializer_range", 0.02)),
        "attention_dropout": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        # Phi-3's defaults (1 / 32000 / 32000) are Phi-3's own vocabulary: always write the source's ids.
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": raw.get("eos_token_id"),
        "pad_token_id": raw.get("pad_token_id"),
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "use_cache": True,
        "torch_dtype": dtype,
        SOURCE_ARCH_KEY: source_arch,
    }


def _unexpected(key: str, where: str) -> Phi3FastError:
    if key.endswith(".bias"):
        return Phi3FastError(f"{where}: tensor '{key}' is a bias, which Phi-3's layers do not have")
    if "expert" in key or "router" in key or ".gate.weight" in key:
        return Phi3FastError(f"{where}: tensor '{key}' belongs to a mixture-of-experts layer (no Phi-3 form)")
    return Phi3FastError(f"{where}: unexpected tensor '{key}' (not a Llama or Phi-3 decoder tensor)")


def phi3_tensors(
    keys: Iterable[str],
    get: Callable[[str], Tensor],
    num_layers: int,
    tied: bool,
    where: str,
    dtype: torch.dtype,
) -> Iterator[tuple[str, Tensor]]:
    """Phi-3-layout tensors, one at a time, from source tensors named the transformers way.

    Each layer may come in the Llama form (q/k/v, gate/up separate) or already fused (a phi3 GGUF); `get` reads
    one source tensor. All names are checked before the first tensor is read."""
    keys = {k for k in keys if not k.endswith("rotary_emb.inv_freq")}  # RoPE is recomputed from the config
    layers: dict[int, set[str]] = {}
    top = set()
    for key in keys:
        m = _LAYER.match(key)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(m.group(2))
        else:
            top.add(key)
    for i, parts in layers.items():
        if i >= num_layers:
            raise Phi3FastError(
                f"{where}: tensor 'model.layers.{i}...' but the config has {num_layers} layers"
            )
        known = set(_LLAMA_LAYER_KEYS) | set(PHI3_LAYER_KEYS)
        for part in sorted(parts - known):
            raise _unexpected(f"model.layers.{i}.{part}", where)
    allowed_top = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for key in sorted(top - allowed_top):
        raise _unexpected(key, where)
    needed = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    for i in range(num_layers):
        parts = layers.get(i, set())
        for fused, pieces in (
            ("self_attn.qkv_proj.weight", [f"self_attn.{p}.weight" for p in _ATTN]),
            ("mlp.gate_up_proj.weight", [f"mlp.{p}.weight" for p in _MLP]),
        ):
            if fused not in parts:
                needed += [f"model.layers.{i}.{p}" for p in pieces]
        needed += [f"model.layers.{i}.{p}" for p in PHI3_LAYER_KEYS if p not in _FUSED_PARTS]
    missing = [k for k in needed if k not in keys]
    if missing:
        raise Phi3FastError(f"{where}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")

    def read(key: str) -> Tensor:
        return get(key).to(dtype)

    yield "model.embed_tokens.weight", read("model.embed_tokens.weight")
    for i in range(num_layers):
        p = f"model.layers.{i}"
        parts = layers[i]
        for part in PHI3_LAYER_KEYS:
            if part in parts:
                yield f"{p}.{part}", read(f"{p}.{part}")
            elif part == "self_attn.qkv_proj.weight":
                yield f"{p}.{part}", torch.cat([read(f"{p}.self_attn.{q}.weight") for q in _ATTN])
            else:  # mlp.gate_up_proj.weight; Phi-3 splits it gate first
                yield f"{p}.{part}", torch.cat([read(f"{p}.mlp.{q}.weight") for q in _MLP])
    yield "model.norm.weight", read("model.norm.weight")
    if not tied:
        yield "lm_head.weight", read("lm_head.weight")


_FUSED_PARTS = ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")
