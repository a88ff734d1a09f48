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


# ---- NF4 decoding ------------------------------------------------------------------------------------------------


def real_absmax(w: NF4Weight) -> Tensor:
    """Per-block fp32 scales; with double quant: nested_code[absmax] * nested_absmax[b // 256] + offset."""
    if not w.double_quant:
        return w.absmax.float()
    nested = w.nested_absmax.float().repeat_interleave(256)[: w.absmax.numel()]
    return w.nested_code.float()[w.absmax.long()] * nested + w.offset.float()


def dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [N, K] in dtype. Computed in fp32 (code * absmax, the order bitsandbytes uses), then rounded once."""
    n, k = check_weight(w)
    packed = w.packed.reshape(-1)
    codes = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1).long()  # high nibble = element 2i
    values = w.code.float()[codes].view(-1, w.blocksize) * real_absmax(w)[:, None]
    return values.view(n, k).to(dtype)


def nf4_matmul(x: Tensor, w: NF4Weight) -> Tensor:
    """x @ W^T in x's dtype (CPU bf16 matmuls accumulate in fp32 inside oneDNN)."""
    n, k = check_weight(w)
    check_input(x, k)
    return x @ dequantize(w, x.dtype).t()
