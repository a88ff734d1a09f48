"""The native decode step: one C++ call per token runs every layer of M sequences (csrc/nf4/decode_step.h).

`NativeDecoder(model, positions)` hands the native module the addresses of the model's weights (NF4 views or
dense fp32 matrices, norms, embedding, lm_head) and of a RoPE table it builds once from the model's own
RotaryEmbedding; `step` then writes K/V into a caller's cache ([layers, slots, kv_heads, cap, head_dim], row m in
slot m, e.g. phi3fast.model.KVCache or the server's slot pool) and returns the logits of each row. LoRA terms are
registered as numbered adapters (the model's own factors are adapter 0 when it has them), and each row names its
adapter, so rows on different adapters share one step.

`unsupported(model)` says why a model must take the torch path instead: not on CPU, activations not fp32,
partial rotary, more than 8 query heads per kv head, a projection or lm_head the step cannot read, or the native
module without the step, or a kernel backend other than 'auto' (the torch path then is the reference). LongRoPE is supported the way transformers applies it per step: the table holds the
short factors for positions below original_max_position_embeddings and the long ones from there on (the caller
re-encodes the sequence at the switch, as phi3fast.generate does).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from phi3fast.kernels import nf4_cpu
from phi3fast.model.lm_head import StoredLMHead
from phi3fast.model.phi3 import Phi3ForCausalLM

SLOTS = {"self_attn.qkv_proj": 0, "self_attn.o_proj": 1, "mlp.gate_up_proj": 2, "mlp.down_proj": 3}
MAX_GROUP = 8  # query heads per kv head the step's attention takes (csrc/nf4/dense.h kDenseMaxRows)


def _native():
    return nf4_cpu._native


def unsupported(model: Phi3ForCausalLM) -> str | None:
    """None when NativeDecoder can run this model, else the reason it cannot."""
    native = _native()
    if not nf4_cpu.available() or not hasattr(native, "NativeDecoder"):
        return "the native module has no decode step"
    cfg = model.config
    if model.kernel_backend != "auto" or any(
        lin.kernel_backend != "auto" for lin in model.linears().values()
    ):
        return "a kernel backend other than 'auto' was chosen (the torch reference path)"
    if model.device.type != "cpu":
        return f"the model is on {model.device}"
    if model.dtype != torch.float32:
        return f"activations in {model.dtype} (the native step runs fp32)"
    if cfg.rotary_dim != cfg.head_dim:
        return f"partial rotary ({cfg.rotary_dim} of {cfg.head_dim} features)"
    if cfg.num_attention_heads // cfg.num_key_value_heads > MAX_GROUP:
        return f"more than {MAX_GROUP} query heads per kv head"
    for name, lin in model.linears().items():
        if lin.nf4 is None and (lin.weight is None or lin.weight.dtype != torch.float32):
            return f"{name}: a base weight that is neither NF4 nor fp32"
        if lin.training and isinstance(lin.lora_dropout, nn.Dropout):
            return f"{name}: LoRA dropout in training mode"
    head = model.lm_head
    if isinstance(head, StoredLMHead):
        return None
    if not isinstance(head, nn.Linear) or head.bias is not None or head.weight.dtype != torch.float32:
        return "an lm_head that is not a bias-free fp32 linear"
    return None


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


class NativeDecoder:
    """Decode steps of `model` for positions below `positions` (the RoPE table's length)."""

    def __init__(self, model: Phi3ForCausalLM, positions: int) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the native decode step cannot run this model: {reason}")
        cfg = model.config
        self.model = model
        self.vocab = cfg.vocab_size
        self._keep: list[object] = []  # every tensor (and NF4 weight) the native side points into
        d = _native().NativeDecoder(
            cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, float(cfg.rms_norm_eps), cfg.sliding_window or 0,
        )  # fmt: skip
        own_lora = False
        for i, layer in enumerate(model.layers):
            d.set_norms(
                i, self._hold(layer.input_layernorm.weight), self._hold(layer.post_attention_layernorm.weight)
            )
            for name, slot in SLOTS.items():
                lin = layer.get_submodule(name)
                if lin.nf4 is not None:
                    self._keep.append(lin.nf4)
                    d.set_nf4(i, slot, nf4_cpu.weight_view(lin.nf4))
                else:
                    d.set_dense(i, slot, self._hold(lin.weight), lin.out_features, lin.in_features)
        self._d = d
        for i, layer in enumerate(model.layers):
            for name, slot in SLOTS.items():
                lin = layer.get_submodule(name)
                if lin.lora_A is not None:
                    self._set_lora(0, i, slot, lin.lora_A, lin.lora_B, lin.lora_scale)
                    own_lora = True
        self.own_adapter = 0 if own_lora else -1
        head = model.lm_head
        store = head.store if isinstance(head, StoredLMHead) else "float32"
        scale = self._hold(head.scale) if store == "int8" else 0
        d.set_globals(
            self._hold(model.embed_tokens.weight), self._hold(model.norm.weight), self._hold(head.weight), store,
            scale,
        )  # fmt: skip
        self.cos, self.sin = rope_table(model, positions)

    def _hold(self, t: Tensor) -> int:
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        self._keep.append(t)
        return _ptr(t)

    def _set_lora(self, index: int, layer: int, slot: int, a: Tensor, b: Tensor, scale: float) -> None:
        a32, b32 = a.detach().float().contiguous(), b.detach().float().contiguous()
        self._keep += [a32, b32]
        self._d.set_lora(index, layer, slot, _ptr(a32), _ptr(b32), a32.shape[0], float(scale))

    def add_adapter(self, weights: dict[str, tuple[Tensor, Tensor, float]]) -> int:
        """Register an adapter {module name: (A [r, in], B [out, r], scale)}; returns the index rows name it by."""
        if self.own_adapter == 0:
            raise ValueError(
                "the model carries LoRA factors of its own: per-row adapters would stack on them"
            )
        if not weights:
            raise ValueError("an adapter with no LoRA tensors")
        index = self._d.adapters
        linears = self.model.linears()
        for name, (a, b, scale) in weights.items():
            lin = linears.get(name)
            if lin is None:
                raise ValueError(f"adapter tensor {name!r} names no projection of the model")
            r = a.shape[0]
            if a.shape != (r, lin.in_features) or b.shape != (lin.out_features, r):
                raise ValueError(f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit [{lin.out_features}, {lin.in_features}]")  # fmt: skip
            layer, rest = name.split(".", 2)[1:]
            self._set_lora(index, int(layer), SLOTS[rest], a, b, scale)
        return index

    def step(
        self,
        tokens: Tensor,
        positions: Tensor,
        adapters: Tensor,
        k: Tensor,
        v: Tensor,
        logits: Tensor,
        *,
        simd: str | None = None,
    ) -> Tensor:
        """logits [M, V] (written in place) for tokens/positions (int64 [M]) and adapter indices (int32 [M],
        -1: none); K/V of row m go into slot m of k/v [layers, slots, kv_heads, cap, head_dim] at its position.
        `simd` forces a SIMD level (tests); the default is the best this CPU has, capped by PHI3FAST_SIMD."""
        self.check(tokens, positions, adapters, k, v, logits)
        return self.run(tokens, positions, adapters, k, v, logits, simd=simd)

    def check(
        self, tokens: Tensor, positions: Tensor, adapters: Tensor, k: Tensor, v: Tensor, logits: Tensor
    ) -> None:
        """The operand checks of step; a caller that passes the same tensors every step checks them once."""
        m = tokens.shape[0]
        for t, dt in ((tokens, torch.int64), (positions, torch.int64), (adapters, torch.int32)):
            if t.dtype != dt or t.shape != (m,) or not t.is_contiguous():
                raise ValueError(
                    f"decode step: expected contiguous {dt} [{m}], got {t.dtype} {tuple(t.shape)}"
                )
        cfg = self.model.config
        want = (cfg.num_hidden_layers, k.shape[1], cfg.num_key_value_heads, k.shape[3], cfg.head_dim)
        if k.shape != want or v.shape != want or k.dtype != torch.float32 or v.dtype != torch.float32:
            raise ValueError(f"decode step: K/V cache {tuple(k.shape)} {k.dtype}, expected {want} float32")
        if not (k.is_contiguous() and v.is_contiguous()):
            raise ValueError("decode step: the K/V cache must be contiguous")
        if logits.shape != (m, self.vocab) or logits.dtype != torch.float32 or not logits.is_contiguous():
            raise ValueError(f"decode step: logits must be contiguous float32 [{m}, {self.vocab}]")

    def run(
        self,
        tokens: Tensor,
        positions: Tensor,
        adapters: Tensor,
        k: Tensor,
        v: Tensor,
        logits: Tensor,
        *,
        simd: str | None = None,
    ) -> Tensor:
        """step without the operand checks: only for operands that passed check (addresses go to C++ as is)."""
        m = tokens.shape[0]
        self._d.step(
            _ptr(tokens), _ptr(positions), _ptr(adapters), m, _ptr(k), _ptr(v), k.shape[1], k.shape[3],
            _ptr(self.cos), _ptr(self.sin), self.cos.shape[0], _ptr(logits), simd, nf4_cpu._threads(None),
        )  # fmt: skip
        return logits


def rope_table(model: Phi3ForCausalLM, positions: int) -> tuple[Tensor, Tensor]:
    """cos, sin [positions, head_dim / 2] fp32 from the model's RotaryEmbedding, one decode step's values per row:
    with LongRoPE, the short factors below original_max_position_embeddings and the long ones from there on."""
    cfg = model.config
    pos = torch.arange(positions)
    if cfg.rope_scaling is None or positions <= cfg.original_max_position_embeddings:
        parts = [pos]
    else:
        split = cfg.original_max_position_embeddings
        parts = [pos[:split], pos[split:]]
    cos, sin = zip(*(model.rotary(p[None], torch.float32) for p in parts), strict=True)
    return torch.cat(cos, dim=1)[0].contiguous(), torch.cat(sin, dim=1)[0].contiguous()


def head_logits(head: StoredLMHead, h: Tensor) -> Tensor:
    """h [M, K] fp32 through a stored lm_head on the native kernels (the prompt's last position)."""
    h = h.detach().float().contiguous()
    m = h.shape[0]
    out = torch.empty((m, head.out_features), dtype=torch.float32)
    scale = head.scale.data_ptr() if head.scale is not None else 0
    _native().head_linear(
        head.weight.data_ptr(), head.store, scale, head.out_features, head.in_features, h.data_ptr(), m,
        out.data_ptr(), None, nf4_cpu._threads(None),
    )  # fmt: skip
    return out
