"""Phi-3 configuration: a frozen dataclass read from any Phi-3-architecture config.json, and the registry of the
released Phi-3 variants.

Which config.json is accepted (the rule)
----------------------------------------
Every configuration transformers' Phi3ForCausalLM accepts (`model_type` "phi3"): any sizes, grouped-query
attention, tied embeddings, partial rotary embeddings (Phi-4-mini: partial_rotary_factor 0.75), a sliding window,
default or LongRoPE scaling, one or several eos ids. Phi-3-small, Phi-3-vision or another architecture is a
Phi3FastError naming what differs. The REGISTRY names the released variants (their sizes, Hub ids and memory
estimates); a checkpoint that matches none loads all the same, as variant "custom". The RoPE factors are read
from config.json, never from the registry: Microsoft revised them between releases.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3fast.errors import Phi3FastError

CUSTOM = "custom"  # the variant name of a Phi-3-architecture checkpoint that is not a released size


@dataclass(frozen=True)
class RopeScaling:
    """LongRoPE ("longrope", formerly "su"): per-frequency divisors, short below the original context, long above."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    # Multiplies cos/sin; None means sqrt(1 + ln(factor) / ln(original_max)).
    attention_factor: float | None = None
    factor: float | None = None  # None: max_position_embeddings / original_max_position_embeddings


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
    partial_rotary_factor: float = 1.0  # RoPE rotates the first rotary_dim features of each head
    explicit_head_dim: int | None = None  # config.json's head_dim, when it is not hidden_size / heads
    # transformers' quantization_config of a bitsandbytes-4bit checkpoint (None for a 16/32-bit one).
    quantization_config: dict[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Features of each head that RoPE rotates (the first ones), as transformers computes it."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_attention_factor(self) -> float:
        """The scale LongRoPE puts on cos/sin (1.0 without scaling), as transformers computes it."""
        if self.rope_scaling is None:
            return 1.0
        if self.rope_scaling.attention_factor is not None:
            return self.rope_scaling.attention_factor
        factor = self.rope_scaling.factor
        if factor is None:
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


def _match_variant(sizes: tuple[int, ...], longrope: bool, name_hint: str) -> str:
    matches = [v.name for v in REGISTRY.values() if v.key() == sizes and v.longrope == longrope]
    if not matches:
        return CUSTOM
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


def _number(raw: dict[str, Any], key: str, default: float, where: str) -> float:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise Phi3FastError(f"{where}: '{key}' must be a number, got {value!r}")
    return float(value)


def config_from_dict(raw: dict[str, Any], where: str = "config.json") -> Phi3Config:
    """Validate a transformers Phi-3 config dict; name the registry variant it is, if any."""
    if raw.get("model_type") != "phi3":
        arch = raw.get("architectures") or raw.get("model_type")
        raise Phi3FastError(
            f"{where}: not a Phi-3-architecture checkpoint (model_type={raw.get('model_type')!r}, "
            f"architectures={arch!r}); phi3fast loads model_type 'phi3' (Phi3ForCausalLM)"
        )
    hidden = _int(raw, "hidden_size", where)
    heads = _int(raw, "num_attention_heads", where)
    kv_heads = raw.get("num_key_value_heads") or heads
    layers = _int(raw, "num_hidden_layers", where)
    vocab = _int(raw, "vocab_size", where)
    inter = _int(raw, "intermediate_size", where)
    max_pos = _int(raw, "max_position_embeddings", where)
    orig_max = raw.get("original_max_position_embeddings") or max_pos
    head_dim = raw.get("head_dim") or None
    if head_dim is None and hidden % heads:
        raise Phi3FastError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if head_dim is not None:
        head_dim = _int(raw, "head_dim", where)
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise Phi3FastError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise Phi3FastError(f"{where}: hidden_act {raw.get('hidden_act')!r} is not Phi-3's 'silu'")
    # transformers 4.x writes "rope_scaling" (+ "rope_theta"), 5.x "rope_parameters" holding both.
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise Phi3FastError(f"{where}: 'rope_scaling' must be an object, got {rope!r}")
    theta = _number(rope, "rope_theta", _number(raw, "rope_theta", 10000.0, where), where)
    partial = _number(rope, "partial_rotary_factor", _number(raw, "partial_rotary_factor", 1.0, where), where)
    dim = head_dim or hidden // heads
    rotary_dim = int(dim * partial)
    if not 0.0 < partial <= 1.0 or rotary_dim < 2 or rotary_dim % 2:
        raise Phi3FastError(
            f"{where}: partial_rotary_factor {partial} gives {rotary_dim} rotary features of head_dim {dim}; "
            "RoPE needs an even number, at least 2"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type in ("longrope", "su", "yarn"):  # transformers reads Phi-3's "su" and "yarn" as longrope
        n = rotary_dim // 2
        short, long = rope.get("short_factor"), rope.get("long_factor")
        for key, fac in (("short_factor", short), ("long_factor", long)):
            if not isinstance(fac, list) or len(fac) != n:
                raise Phi3FastError(f"{where}: rope '{key}' must be a list of {n} numbers")
        att, factor = rope.get("attention_factor"), rope.get("factor")
        orig_max = rope.get("original_max_position_embeddings") or orig_max
        scaling = RopeScaling(
            tuple(map(float, short)),
            tuple(map(float, long)),
            None if att is None else float(att),
            None if factor is None else float(factor),
        )
    elif rope_type != "default":
        raise Phi3FastError(
            f"{where}: rope type {rope_type!r} is not supported (phi3fast runs Phi-3's default and longrope)"
        )
    window = raw.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise Phi3FastError(f"{where}: 'sliding_window' must be a positive integer or null, got {window!r}")

    sizes = (hidden, inter, layers, heads, kv_heads, vocab, max_pos)
    standard = head_dim in (None, hidden // heads) and partial == 1.0
    variant = (
        _match_variant(sizes, scaling is not None, str(raw.get("_name_or_path", ""))) if standard else CUSTOM
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
        sliding_window=window,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=raw.get("pad_token_id"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        partial_rotary_factor=partial,
        explicit_head_dim=head_dim if head_dim != hidden // heads else None,
        quantization_config=raw.get("quantization_config"),
    )


def read_config_json(path: str | Path, checkpoint: str = "a Phi-3 checkpoint") -> dict[str, Any]:
    """A checkpoint's config.json as a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise Phi3FastError(f"{path}: missing ({checkpoint} needs config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Phi3FastError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise Phi3FastError(f"{path}: expected a JSON object")
    return raw


def load_config(path: str | Path) -> Phi3Config:
    """Read and validate a config.json; errors name the file."""
    return config_from_dict(read_config_json(path), str(path))
