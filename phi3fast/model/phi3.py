"""A lean Phi-3 decoder: RMSNorm, fused qkv, RoPE (incl. LongRoPE), SwiGLU with fused gate_up, SDPA, KV cache.

Every projection inside the decoder layers is a `Phi3Linear`, whose base weight is either an NF4Weight (QLoRA) or a
frozen compute-dtype tensor (plain LoRA / inference), plus optional LoRA factors. `Phi3Linear.forward` is the one
place that picks the op: `nf4_matmul` / `lora_linear` from phi3fast.kernels (Triton on CUDA, torch on CPU).
Embeddings, norms and lm_head stay dense in the compute dtype. RMSNorm, RoPE (in place on the fused qkv output) and
SwiGLU (on the fused gate_up output) are phi3fast.kernels' row-wise ops, with the backend chosen by
`Phi3ForCausalLM.set_kernel_backend` ('auto': Triton on CUDA, the torch reference, bit-identical to
transformers' math, on CPU). Module names follow transformers' checkpoint keys
without the leading "model." (`layers.0.self_attn.qkv_proj`), so loading and PEFT adapters map one to one.

Dropout: Phi-3's configs set attention and residual dropout to 0, so this module has none; LoRA dropout lives in
Phi3Linear. This file holds modules only: phi3fast.model.loading builds them from a checkpoint.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from phi3fast.errors import Phi3FastError
from phi3fast.kernels import lora_linear, nf4_cpu, nf4_linear, rms_norm, rope_qkv_, swiglu
from phi3fast.kernels.backend import BACKENDS
from phi3fast.kernels.lora import lora_dropout
from phi3fast.model.config import Phi3Config

if TYPE_CHECKING:
    from phi3fast.quant import NF4Weight


# SDPA's enable_gqa (torch >= 2.5): the same result as repeating the kv heads, without copying the KV cache
# every decode step.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
# query x key positions from which CPU attention runs on every thread (a 128-token prompt and up)
_SDPA_BIG = 128 * 128
_DENSE_BIG_ROWS = 64  # rows from which a dense CPU projection does too


class Phi3Linear(nn.Module):
    """y = x W^T (+ scale * dropout(x) A^T B^T with LoRA). W is frozen: an NF4Weight or a dense Parameter.

    The linear owns its adapter: `add_lora` creates A and B; phi3fast.lora chooses which linears get one."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight: nn.Parameter | None = None  # dense base (quantize=None)
        self.nf4: NF4Weight | None = None  # NF4 base (quantize='nf4')
        self.lora_A: nn.Parameter | None = None  # [r, in]
        self.lora_B: nn.Parameter | None = None  # [out, r]
        self.lora_scale = 0.0
        self.lora_dropout: nn.Module = nn.Identity()
        # Backend of the NF4 ops: 'auto' runs Triton on CUDA and the torch reference on CPU. set_kernel_backend
        # leaves it (the row-wise kernels only); tests set 'triton' to run the NF4 kernels in the interpreter.
        self.kernel_backend = "auto"

    def set_base(self, w: Tensor | NF4Weight) -> None:
        if isinstance(w, Tensor):
            self.weight = nn.Parameter(w, requires_grad=False)
            self.nf4 = None
        else:
            self.weight = None
            self.nf4 = w

    @property
    def base(self) -> Tensor | NF4Weight:
        base = self.nf4 if self.nf4 is not None else self.weight
        if base is None:
            raise RuntimeError("Phi3Linear has no base weight (not loaded)")
        return base

    def add_lora(self, r: int, scale: float, dropout: float) -> None:
        """Trainable LoRA factors: A [r, in] Kaiming-uniform (PEFT's default init), B [out, r] zeros, so the delta
        starts at 0. Kept in fp32 (master weights) on the base's device, whatever the compute dtype."""
        device = self.nf4.device if self.nf4 is not None else self.base.device
        a = torch.empty(r, self.in_features, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=device))
        self.lora_scale = scale
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The base weight as a dense [out, in] tensor (dequantized if NF4), without the LoRA delta."""
        if self.nf4 is not None:
            return self.nf4.dequantize(dtype)
        return self.base.detach().to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.lora_A is None:
            if self.nf4 is not None:
                # Differentiable in x (the frozen weight gets no gradient): a layer below may be training.
                return nf4_linear(x, self.nf4, self.kernel_backend)
            # A dense prompt-sized GEMM gets every thread back inside the one-thread loops (see Attention).
            big = x.device.type == "cpu" and x.numel() >= _DENSE_BIG_ROWS * self.in_features
            with nf4_cpu.full_threads() if big else nullcontext():
                return F.linear(x, self.weight)
        # LoRA factors are kept in fp32 (master weights); the cast is differentiable, so grads land in fp32.
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        # x_lora=None lets the kernel reuse x (no dropout copy) whenever dropout is off or in eval mode.
        drop = self.lora_dropout if self.training and isinstance(self.lora_dropout, nn.Dropout) else None
        x_lora = lora_dropout(x, drop.p) if drop is not None and drop.p > 0 else None
        return lora_linear(x, self.base, a, b, self.lora_scale, x_lora=x_lora, backend=self.kernel_backend)

    def _apply(self, fn: Any, recurse: bool = True) -> Phi3Linear:
        # .to(device)/.cuda() must move the NF4 tensors too; dtype casts must not touch them (their own dtypes).
        super()._apply(fn, recurse)
        if self.nf4 is not None:
            probe = fn(torch.empty(0, device=self.nf4.packed.device))
            if probe.device != self.nf4.packed.device:
                self.nf4 = self.nf4.to(probe.device)
        return self

    def extra_repr(self) -> str:
        kind = "nf4" if self.nf4 is not None else "dense"
        r = 0 if self.lora_A is None else self.lora_A.shape[0]
        return f"in={self.in_features}, out={self.out_features}, base={kind}, lora_r={r}"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.kernel_backend = "auto"  # set by Phi3ForCausalLM.set_kernel_backend

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32, then cast back before the weight, exactly as transformers' Phi3RMSNorm; the torch
        # backend runs exactly that code (phi3fast.kernels.rmsnorm.rms_norm_reference).
        return rms_norm(x, self.weight, self.eps, self.kernel_backend)


class RotaryEmbedding(nn.Module):
    """RoPE cos/sin for given positions. LongRoPE: long factors for the whole call once max(pos)+1 exceeds
    original_max_position_embeddings (transformers' rule), and an attention factor scaling cos and sin."""

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.config = config
        self._inv: dict[tuple[str, bool], Tensor] = {}

    def inv_freq(self, device: torch.device, long: bool) -> Tensor:
        key = (str(device), long)
        if key not in self._inv:
            cfg = self.config
            dim = cfg.rotary_dim  # partial rotary: the first rotary_dim features of each head
            inv = cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
            if cfg.rope_scaling is not None:
                ext = cfg.rope_scaling.long_factor if long else cfg.rope_scaling.short_factor
                inv = torch.tensor(ext, dtype=torch.float32) * inv
            self._inv[key] = (1.0 / inv).to(device)
        return self._inv[key]

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cfg = self.config
        long = (
            cfg.rope_scaling is not None
            and int(position_ids.max()) + 1 > cfg.original_max_position_embeddings
        )
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device, long)  # [B, T, D/2]
        scale = cfg.rope_attention_factor
        return (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: [layers, B, kv_heads, max_len, head_dim]."""

    k: Tensor
    v: Tensor
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.qkv_proj = Phi3Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim)
        self.o_proj = Phi3Linear(self.n_heads * self.head_dim, config.hidden_size)
        self.kernel_backend = "auto"  # set by Phi3ForCausalLM.set_kernel_backend

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, causal: bool, cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        # RoPE in place on the fused projection output, q and k heads only (phi3fast.kernels.rope). transformers
        # computes x * cat(cos, cos) + rotate_half(x) * cat(sin, sin); per half that is (x1 cos - x2 sin,
        # x2 cos + x1 sin), the same roundings, which the torch backend computes.
        qkv = rope_qkv_(self.qkv_proj(x), cos, sin, self.n_heads, self.n_kv, self.kernel_backend)
        q, k, v = qkv.split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        q = q.view(B, T, self.n_heads, hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        gqa = {}
        if self.n_kv != self.n_heads:  # GQA (Phi-3-medium): each kv head serves n_heads / n_kv query heads
            if x.device.type == "cpu" and _SDPA_GQA:
                gqa["enable_gqa"] = True  # CPU SDPA reads the shared kv heads in place: no copy of the cache
            else:
                k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        # A long prompt's attention is one large op: inside a loop that pins torch's small ops to one thread
        # (generate, the CPU training step), it gets every thread back (nf4_cpu.full_threads).
        big = x.device.type == "cpu" and T * k.shape[2] >= _SDPA_BIG
        with nf4_cpu.full_threads() if big else nullcontext():
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **gqa)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * hd))


class MLP(nn.Module):
    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.gate_up_proj = Phi3Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Phi3Linear(config.intermediate_size, config.hidden_size)
        self.kernel_backend = "auto"  # set by Phi3ForCausalLM.set_kernel_backend

    def forward(self, x: Tensor) -> Tensor:
        # Fused rows: gate first, then up; the torch backend computes up * silu(gate), as transformers does.
        return self.down_proj(swiglu(self.gate_up_proj(x), self.kernel_backend))


class DecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        causal: bool,
        cache: KVCache | None = None,
    ) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, causal, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_mask(
    batch: int, q_len: int, past: int, seq_ids: Tensor | None, window: int | None, device: torch.device
) -> tuple[Tensor | None, bool]:
    """(bool mask [B|1, 1, T, past+T] with True = attend, or None with is_causal) for SDPA.

    Causal over absolute cache positions; with seq_ids, block-diagonal (a packed sample never sees another);
    with a sliding window w, key j is visible from query i only if j > i - w (transformers' rule).
    """
    kv_len = past + q_len
    window_bites = window is not None and kv_len > window
    if seq_ids is None and not window_bites:
        if past == 0:
            return None, True
        if q_len == 1:
            return None, False
    qi = torch.arange(past, kv_len, device=device)[:, None]
    kj = torch.arange(kv_len, device=device)[None, :]
    mask = kj <= qi
    if window_bites:
        mask = mask & (kj > qi - window)
    mask = mask[None, None]
    if seq_ids is not None:
        if past != 0:
            raise ValueError("seq_ids (packing) is for training forward passes, not with a KV cache")
        same = seq_ids[:, :, None] == seq_ids[:, None, :]  # [B, T, T]
        mask = mask & same[:, None]
    return mask, False


class Phi3ForCausalLM(nn.Module):
    """phi3fast's Phi-3. Build it with `phi3fast.model.load`; `model(input_ids)` -> logits [B, T, V]."""

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.tokenizer: Any = None
        self.model_dir: Path | None = None
        self.name_or_path = ""  # what the caller passed (a path or a Hub id); adapters record it
        self.lora_config: Any = None  # a phi3fast.lora.LoraConfig once adapters are added
        self._kernel_backend = "auto"  # each RMSNorm, Attention and MLP starts at 'auto' too

    @property
    def kernel_backend(self) -> str:
        """Backend of the norms, RoPE and SwiGLU: 'auto' (Triton on CUDA, torch on CPU), 'triton' or 'torch'."""
        return self._kernel_backend

    @kernel_backend.setter
    def kernel_backend(self, backend: str) -> None:
        self.set_kernel_backend(backend)

    def set_kernel_backend(self, backend: str) -> None:
        """Pick the backend of the row-wise kernels (RMSNorm, RoPE, SwiGLU) in every layer; the linears keep
        their own 'auto' (NF4/LoRA kernels on CUDA)."""
        if backend not in BACKENDS:
            raise Phi3FastError(f"kernel backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self._kernel_backend = backend
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, MLP)):
                m.kernel_backend = backend

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def linears(self) -> dict[str, Phi3Linear]:
        """Every decoder projection by its module name (e.g. 'layers.0.self_attn.qkv_proj')."""
        return {name: m for name, m in self.named_modules() if isinstance(m, Phi3Linear)}

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return KVCache(
            torch.empty(shape, dtype=self.dtype, device=self.device),
            torch.empty(shape, dtype=self.dtype, device=self.device),
        )

    def hidden_states(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        seq_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Final-norm hidden states [B, T, H] (before lm_head)."""
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, h.dtype)
        mask, causal = attention_mask(B, T, past, seq_ids, self.config.sliding_window, h.device)
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for layer in self.layers:
            if use_ckpt:
                # Recompute the layer in backward: activations of only one layer live at a time.
                h = checkpoint(layer, h, cos, sin, mask, causal, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, causal, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(h)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        seq_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        return self.lm_head(self.hidden_states(input_ids, position_ids, seq_ids, kv_cache))
