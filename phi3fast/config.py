"""Phi-3 configuration: a frozen dataclass and the registry of the Phi-3 variants phi3fast supports.

Which config.json is accepted (the rule)
----------------------------------------
A config.json is accepted when `model_type` is "phi3" (architecture Phi3ForCausalLM) and either
- its sizes (hidden, intermediate, layers, heads, kv heads, vocab, context) equal one REGISTRY entry:
  Phi-3-mini-4k, Phi-3-mini-128k, Phi-3-medium-4k, Phi-3-medium-128k, Phi-3.5-mini; or
- it is a small test model ("tiny" family): hidden_size <= TINY_MAX_HIDDEN and num_hidden_layers <= TINY_MAX_LAYERS,
  as `phi3fast init-tiny` writes and the benchmarks use (any vocab).
Anything else (Phi-3-small's different architecture, Phi-3-vision, Phi-4, a custom size) is a Phi3FastError that
lists what is supported. The RoPE factors of the 128k variants are read from config.json, not from the registry:
Microsoft revised them between releases (Phi-3-mini-128k vs Phi-3.5-mini), so the file is the truth.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3fast.errors import Phi3FastError

TINY_MAX_HIDDEN = 1024
TINY_MAX_LAYERS = 8


@dataclass(frozen=True)
class RopeScaling:
    """LongRoPE ("longrope", formerly "su"): per-frequency divisors, short below the original context, long above."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    # Multiplies cos/sin; None means sqrt(1 + ln(factor) / ln(original_max)) with factor = max / original_max.
    attention_factor: float | None = None


@dataclass(frozen=True)
class Phi3Config:
    variant: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 32000
    pad_token_id: int | None = 32000
    tie_word_embeddings: bool = False
    # transformers' quantization_config of a bitsandbytes-4bit checkpoint (None for a 16/32-bit one).
    quantization_config: dict[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_attention_factor(self) -> float:
        """The scale LongRoPE puts on cos/sin (1.0 without scaling), as transformers computes it."""
        if self.rope_scaling is None:
            return 1.0
        if self.rope_scaling.attention_factor is not None:
            return self.rope_scaling.attention_factor
        factor = self.max_position_embeddings / self.original_max_position_embeddings
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))


@dataclass(frozen=True)
class Variant:
    """The sizes that identify one released Phi-3 model (everything a config.json must match)."""

    name: str
    hub_id: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    longrope: bool

    def key(self) -> tuple[int, ...]:
        return (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.vocab_size,
            self.max_position_embeddings,
        )


_MINI = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32)
_MEDIUM = dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40)
REGISTRY: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            "phi-3-mini-4k",
            "microsoft/Phi-3-mini-4k-instruct",
            **_MINI,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
            longrope=False,
        ),  # fmt: skip
        Variant(
            "phi-3-mini-128k",
            "microsoft/Phi-3-mini-128k-instruct",
            **_MINI,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=131072,
            longrope=True,
        ),  # fmt: skip
        Variant(
            "phi-3.5-mini",
            "microsoft/Phi-3.5-mini-instruct",
            **_MINI,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=131072,
            longrope=True,
        ),  # fmt: skip
        Variant(
            "phi-3-medium-4k",
            "microsoft/Phi-3-medium-4k-instruct",
            **_MEDIUM,
            num_key_value_heads=10,
            vocab_size=32064,
            max_position_embeddings=4096,
            longrope=False,
        ),  # fmt: skip
        Variant(
            "phi-3-medium-128k",
            "microsoft/Phi-3-medium-128k-instruct",
            **_MEDIUM,
            num_key_value_heads=10,
            vocab_size=32064,
            max_position_embeddings=131072,
            longrope=True,
        ),  # fmt: skip
    ]
}


def _match_variant(sizes: tuple[int, ...], name_hint: str) -> str | None:
    matches = [v.name for v in REGISTRY.values() if v.key() == sizes]
    if not matches:
        return None
    # Phi-3-mini-128k and Phi-3.5-mini share every size; the checkpoint's own name decides when it says.
    for name in matches:
        if name.replace("-", "").replace(".", "") in name_hint.lower().replace("-", "").replace(".", ""):
            return name
    return matches[0]


def _int(raw: dict[str, Any], key: str, where: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise Phi3FastError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def config_from_dict(raw: dict[str, Any], where: str = "config.json") -> Phi3Config:
    """Validate a transformers Phi-3 config dict and map it to a registry variant (or the tiny family)."""
    if raw.get("model_type") != "phi3":
        arch = raw.get("architectures") or raw.get("model_type")
        raise Phi3FastError(
            f"{where}: not a Phi-3 checkpoint (model_type={raw.get('model_type')!r}, architectures={arch!r}); "
            f"phi3fast supports {', '.join(REGISTRY)} and tiny test models"
        )
    hidden = _int(raw, "hidden_size", where)
    heads = _int(raw, "num_attention_heads", where)
    kv_heads = raw.get("num_key_value_heads") or heads
    layers = _int(raw, "num_hidden_layers", where)
    vocab = _int(raw, "vocab_size", where)
    inter = _int(raw, "intermediate_size", where)
    max_pos = _int(raw, "max_position_embeddings", where)
    orig_max = raw.get("original_max_position_embeddings") or max_pos
    if hidden % heads or heads % kv_heads:
        raise Phi3FastError(
            f"{where}: hidden_size {hidden} / heads {heads} / kv heads {kv_heads} do not divide"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise Phi3FastError(f"{where}: hidden_act {raw.get('hidden_act')!r} is not Phi-3's 'silu'")
    if (
        raw.get("partial_rotary_factor", 1.0) != 1.0
        or raw.get("head_dim", hidden // heads) != hidden // heads
    ):
        raise Phi3FastError(f"{where}: partial rotary / custom head_dim is not a Phi-3 configuration")

    sizes = (hidden, inter, layers, heads, kv_heads, vocab, max_pos)
    variant = _match_variant(sizes, str(raw.get("_name_or_path", "")))
    if variant is None:
        # Any other size of the Phi-3 architecture loads (the registry names released models, it is no gate).
        variant = "tiny" if hidden <= TINY_MAX_HIDDEN and layers <= TINY_MAX_LAYERS else "custom"

    # transformers 4.x writes "rope_scaling" (+ "rope_theta"), 5.x "rope_parameters" holding both.
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type in ("longrope", "su"):
        n = hidden // heads // 2
        short, long = rope.get("short_factor"), rope.get("long_factor")
        for key, fac in (("short_factor", short), ("long_factor", long)):
            if not isinstance(fac, list) or len(fac) != n:
                raise Phi3FastError(f"{where}: rope '{key}' must be a list of {n} numbers")
        att = rope.get("attention_factor")
        scaling = RopeScaling(
            tuple(map(float, short)), tuple(map(float, long)), None if att is None else float(att)
        )
    elif rope_type != "default":
        raise Phi3FastError(f"{where}: rope type {rope_type!r} is not Phi-3's (default or longrope)")
    if variant in REGISTRY and REGISTRY[variant].longrope != (scaling is not None):
        raise Phi3FastError(
            f"{where}: {variant} needs {'longrope' if REGISTRY[variant].longrope else 'no'} scaling"
        )

    eos = raw.get("eos_token_id", 32000)
    return Phi3Config(
        variant=variant,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        original_max_position_embeddings=orig_max,
        rope_theta=theta,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_scaling=scaling,
        sliding_window=raw.get("sliding_window"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=raw.get("pad_token_id"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        quantization_config=raw.get("quantization_config"),
    )


def load_config(path: str | Path) -> Phi3Config:
    """Read and validate a config.json; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise Phi3FastError(f"{path}: missing (a Phi-3 checkpoint needs config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Phi3FastError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise Phi3FastError(f"{path}: expected a JSON object")
    return config_from_dict(raw, str(path))
