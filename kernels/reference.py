"""PyTorch reference for the NF4 kernels: the CPU runtime path (fp32 and bf16) and the tests' building blocks.

Everything here is plain torch, so it runs on any device. The Triton launchers in nf4.py and lora.py share the
argument checks below, so every backend rejects bad input with the same message.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from phi3fast.errors import Phi3FastError

if TYPE_CHECKING:
    from phi3fast.quant import NF4Weight

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere. 'triton' off CUDA needs Triton's interpreter."""
    if backend not in BACKENDS:
        raise Phi3FastError(f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Phi3FastError(
            f"backend='triton' on a {device.type} tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before phi3fast.kernels is imported, or use backend='auto'"
        )
    return backend


def check_weight(w: NF4Weight) -> tuple[int, int]:
    """(N, K) of an NF4 weight whose K and N are multiples of its blocksize (every kernel tile relies on it)."""
    n, k = w.shape
    bs = w.blocksize
    if bs < 32 or bs & (bs - 1):
        raise Phi3FastError(
            f"NF4 blocksize {bs}: expected a power of two >= 32 (the kernels' K-tile is 32 or 64)"
        )
    if k % bs or n % bs:
        raise Phi3FastError(
            f"NF4 weight of shape ({n}, {k}): K={k} and N={n} must both be multiples of the blocksize {bs} "
            "(each K-tile of a row must cover whole absmax blocks)"
        )
    if w.packed.numel() * 2 != n * k:
        raise Phi3FastError(
            f"NF4 weight of shape ({n}, {k}) holds {w.packed.numel()} packed bytes, expected {n * k // 2}"
        )
    return n, k


def check_input(x: Tensor, k: int, name: str = "x") -> None:
    if not x.is_floating_point():
        raise Phi3FastError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise Phi3FastError(f"{name} of shape {tuple(x.shape)}: the last dimension must be K={k}")


def check_lora(x: Tensor, n: int, k: int, lora_a: Tensor, lora_b: Tensor, x_lora: Tensor | None) -> None:
    check_input(x, k)
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise Phi3FastError(f"lora_a of shape {tuple(lora_a.shape)}: expected (r, K={k})")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (n, r):
        raise Phi3FastError(f"lora_b of shape {tuple(lora_b.shape)}: expected (N={n}, r={r})")
    if x_lora is not None and x_lora.shape != x.shape:
        raise Phi3FastError(f"x_lora of shape {tuple(x_lora.shape)} must match x's shape {tuple(x.shape)}")


# ---- NF4 math ---------------------------------------------------------------------------------------------------


def dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [N, K] in dtype: code * absmax in fp32, then one rounding (NF4Weight.dequantize, bitsandbytes' order)."""
    check_weight(w)
    return w.dequantize(dtype)


def nf4_matmul(x: Tensor, w: NF4Weight) -> Tensor:
    """x @ W^T in x's dtype (CPU bf16 matmuls accumulate in fp32 inside oneDNN)."""
    n, k = check_weight(w)
    check_input(x, k)
    return x @ dequantize(w, x.dtype).t()


def base_plus_lora(x2: Tensor, w: NF4Weight, t: Tensor, b: Tensor, scale: float) -> Tensor:
    """x2 W^T + scale * t B^T for x2 [M, K], t = x_lora A^T [M, r] (the LoRA forward's two GEMMs)."""
    return (x2 @ dequantize(w, x2.dtype).t()).addmm_(t, b.t(), alpha=scale)


def lora_dx(g2: Tensor, w: NF4Weight, lora: tuple[Tensor, Tensor, float] | None) -> Tensor:
    """dY W (+ scale * u A with u = dY B, when x_lora is x): the LoRA backward's input gradient."""
    dx = g2 @ dequantize(w, g2.dtype)
    if lora is not None:
        u, a, scale = lora
        dx.addmm_(u, a, alpha=scale)
    return dx
