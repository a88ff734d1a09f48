"""Rotary position embedding applied in place to the fused qkv projection output, in Triton.

qkv [B, T, (n_heads + 2 * n_kv_heads) * D] holds the q heads, then the k heads, then the v heads of each token
(Phi-3's fused qkv_proj). The q and k heads are the first n_heads + n_kv_heads heads of the row, contiguous, so
one loop over them rotates both (GQA included: n_kv_heads < n_heads only changes the count); v is never touched.
Per head, with halves x1 = x[:R/2], x2 = x[R/2:R] of its first R features and the half-width cos/sin
[B, T, R/2] of phi3fast.model.RotaryEmbedding (LongRoPE's short/long factors and attention factor are already in
them):
    (x1, x2) <- (x1 cos - x2 sin, x2 cos + x1 sin)          fp32 math, rounded once on store.
R is the head_dim D, or less with partial rotary embeddings (Phi-4-mini rotates 3/4 of each head); the features
past R pass unchanged, as in transformers.
The backward is the transpose of that rotation, a rotation by -theta, applied in place to the incoming gradient.

In place (note): no [B, T, heads, D] copy of q and k is made, and nothing of qkv is saved for backward (only cos
and sin, shared by every layer). Recompute under gradient checkpointing is safe: the layer recomputes qkv from its
input and rotates the fresh tensor again. The backward writes into the incoming gradient when it is a contiguous
buffer (in the model it is the gradient the split of qkv assembles for this node alone); a non-contiguous one
(an expanded gradient of a sum, a transposed view) is copied first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _rowwise, nf4_cpu
from ._aot import AotSpec
from .backend import INTERPRET, KernelInputError

# 1024 elements of each half per tile (16 heads x 64 for Phi-3's head_dim 96 or 128) with 4 warps: 8 fp32 values
# per thread per live array. In the interpreter, 2 heads per tile so the head loop and its mask run in tests.
TILE_ELEMENTS = 1024
NUM_WARPS = 4
INTERPRET_HEADS = 2


# ---- kernels -----------------------------------------------------------------------------------------------------


@triton.jit
def _rope_kernel(
    qkv_ptr, cos_ptr, sin_ptr,
    T, n_rot_heads, half, head_dim,
    stride_qb, stride_qt, stride_cb, stride_ct, stride_sb, stride_st,
    INVERSE: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """One token per program: rotate the first 2 * half features of its first n_rot_heads heads (of width head_dim)
    by theta, or by -theta when INVERSE (the backward)."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    cos = tl.load(cos_ptr + b * stride_cb + t * stride_ct + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * stride_sb + t * stride_st + cols, mask=col_mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    row = qkv_ptr + b * stride_qb + t * stride_qt
    for h0 in range(0, n_rot_heads, BLOCK_HEADS):
        heads = h0 + tl.arange(0, BLOCK_HEADS)
        mask = (heads < n_rot_heads)[:, None] & col_mask[None, :]
        p1 = row + heads[:, None] * head_dim + cols[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(p1, o1.to(qkv_ptr.dtype.element_ty), mask=mask)
        tl.store(p1 + half, o2.to(qkv_ptr.dtype.element_ty), mask=mask)


# ---- launchers ---------------------------------------------------------------------------------------------------


def launch_config(half: int, interpret: bool = INTERPRET) -> tuple[int, int]:
    """(BLOCK_HEADS, BLOCK_HALF) for heads of width 2 * half."""
    block_half = triton.next_power_of_2(half)
    if interpret:
        return INTERPRET_HEADS, block_half
    return max(TILE_ELEMENTS // block_half, 1), block_half


def rotate_triton_(
    qkv: Tensor, cos: Tensor, sin: Tensor, n_rot_heads: int, head_dim: int, inverse: bool
) -> Tensor:
    b, t, _ = qkv.shape
    half = cos.shape[-1]
    if b * t:
        block_heads, block_half = launch_config(half)
        _rope_kernel[(b * t,)](
            qkv, cos, sin, t, n_rot_heads, half, head_dim,
            qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            INVERSE=inverse, BLOCK_HEADS=block_heads, BLOCK_HALF=block_half, num_warps=NUM_WARPS,
        )  # fmt: skip
    return qkv


def rotate_reference_(
    qkv: Tensor, cos: Tensor, sin: Tensor, n_rot_heads: int, head_dim: int, inverse: bool
) -> Tensor:
    """The CPU runtime path: transformers' out-of-place rotation, the same elementwise ops in qkv's dtype (so CPU
    results are bit-identical to it), written back into qkv."""
    half = cos.shape[-1]
    x = qkv.unflatten(-1, (qkv.shape[-1] // head_dim, head_dim))[:, :, :n_rot_heads]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    if inverse:
        s = -s
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    x1.copy_(o1)
    x2.copy_(o2)
    return qkv


def rope_reference(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int) -> Tensor:
    """Out of place and differentiable by autograd (the tests' oracle): q and k heads rotated on their first
    2 * half features (the rest and v copied)."""
    half = cos.shape[-1]
    d = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    heads = qkv.unflatten(-1, (n_heads + 2 * n_kv_heads, d))
    rot, v = heads[:, :, : n_heads + n_kv_heads], heads[:, :, n_heads + n_kv_heads :]
    x1, x2, rest = rot[..., :half], rot[..., half : 2 * half], rot[..., 2 * half :]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1)
    return torch.cat((rot, v), dim=2).flatten(-2)


# ---- autograd ----------------------------------------------------------------------------------------------------


class RopeQkvFunction(torch.autograd.Function):
    """qkv is modified in place (mark_dirty); cos and sin get no gradient (positions are not learned)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_rot_heads, head_dim, backend):
        rotate = rotate_reference_ if backend == "torch" else rotate_triton_
        rotate(qkv, cos, sin, n_rot_heads, head_dim, False)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(cos, sin)
        ctx.n_rot_heads, ctx.head_dim, ctx.backend = n_rot_heads, head_dim, backend
        return qkv

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        # The rotation by -theta overwrites the gradient buffer: only one this node may own (see the module note).
        grad = grad if grad.is_contiguous() else grad.contiguous()
        rotate = rotate_reference_ if ctx.backend == "torch" else rotate_triton_
        return rotate(grad, cos, sin, ctx.n_rot_heads, ctx.head_dim, True), None, None, None, None, None


def check_rope(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int) -> None:
    _rowwise.check_float(qkv, "qkv")
    _rowwise.check_float(cos, "cos")
    _rowwise.check_float(sin, "sin")
    for name, n in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise KernelInputError(f"{name}={n!r}: expected a positive integer")
    if qkv.dim() != 3:
        raise KernelInputError(
            f"qkv of shape {tuple(qkv.shape)}: expected (B, T, (n_heads + 2 * n_kv_heads) * D)"
        )
    heads = n_heads + 2 * n_kv_heads
    if qkv.shape[-1] % heads:
        raise KernelInputError(
            f"qkv of shape {tuple(qkv.shape)}: last dimension is not a multiple of n_heads + 2 * n_kv_heads = {heads}"
        )
    d = qkv.shape[-1] // heads
    if d % 2:
        raise KernelInputError(
            f"qkv of shape {tuple(qkv.shape)}: head_dim {d} must be even (RoPE rotates halves)"
        )
    for name, c in (("cos", cos), ("sin", sin)):
        if c.dim() != 3 or tuple(c.shape[:2]) != tuple(qkv.shape[:2]) or not 1 <= c.shape[-1] <= d // 2:
            raise KernelInputError(
                f"{name} of shape {tuple(c.shape)}: expected (B, T, R / 2) with B, T = {tuple(qkv.shape[:2])} "
                f"and R <= head_dim {d} the rotated features"
            )
    if cos.shape != sin.shape:
        raise KernelInputError(f"cos of shape {tuple(cos.shape)} and sin of shape {tuple(sin.shape)} differ")
        if c.device != qkv.device:
            raise KernelInputError(f"{name} is on {c.device}, qkv on {qkv.device}")
    if qkv.stride(-1) != 1:
        raise KernelInputError(f"qkv with strides {qkv.stride()}: the last dimension must be contiguous")


def rope_qkv_(
    qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int, backend: str = "auto"
) -> Tensor:
    """Rotate the q and k heads of the fused qkv [B, T, (n_heads + 2 * n_kv_heads) * D] in place by the
    half-width cos/sin [B, T, R/2] (R = D, or the rotated part with partial rotary embeddings: the first R
    features of each head); v is untouched. Returns qkv. Differentiable in qkv.

    The backward rotates the incoming gradient in place (no copy): a gradient tensor handed to
    `out.backward(grad)` by the caller is overwritten, so pass a copy if it is needed afterwards."""
    check_rope(qkv, cos, sin, n_heads, n_kv_heads)
    resolved = _rowwise.resolve(backend, qkv)
    if (
        resolved == "torch"
        and backend == "auto"
        and qkv.is_contiguous()
        and nf4_cpu.rowwise_ok(qkv, cos, sin)
    ):
        return nf4_cpu.rope_qkv_(qkv, cos, sin, n_heads + n_kv_heads)  # CPU inference: in place, one pass
    if resolved == "triton" and (cos.stride(-1) != 1 or sin.stride(-1) != 1):
        cos, sin = cos.contiguous(), sin.contiguous()
    head_dim = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    return RopeQkvFunction.apply(qkv, cos, sin, n_heads + n_kv_heads, head_dim, resolved)


# ---- AOT specs ---------------------------------------------------------------------------------------------------

AOT_HEAD_DIMS = (96, 128)  # Phi-3-mini and Phi-3-medium (both tile as 16 heads x 64)


def aot_specs() -> list[AotSpec]:
    """Forward and backward rotation for the GPU activation dtypes at Phi-3's head dims, with the alignment the
    JIT specializes at those sizes (16-byte vector loads)."""
    specs = []
    seen = set()
    for dname, ptr in _rowwise.AOT_DTYPES.items():
        for d in AOT_HEAD_DIMS:
            block_heads, block_half = launch_config(d // 2, interpret=False)
            for inverse in (False, True):
                key = (dname, block_heads, block_half, inverse)
                if key in seen:
                    continue
                seen.add(key)
                sig = {"qkv_ptr": ptr, "cos_ptr": ptr, "sin_ptr": ptr, "T": "i32", "n_rot_heads": "i32", "half": "i32",
                       "head_dim": "i32",
                       "stride_qb": "i32", "stride_qt": "i32", "stride_cb": "i32", "stride_ct": "i32",
                       "stride_sb": "i32", "stride_st": "i32"}  # fmt: skip
                consts = {"INVERSE": inverse, "BLOCK_HEADS": block_heads, "BLOCK_HALF": block_half}
                label = f"{dname},inverse={int(inverse)},BLOCK_HEADS={block_heads},BLOCK_HALF={block_half},w={NUM_WARPS}"
                # half (48 or 64), head_dim and every stride are multiples of 16 at Phi-3's sizes; T and the head
                # count vary.
                aligned = _rowwise.aligned_args(
                    sig, tuple(n for n in sig if n in ("half", "head_dim") or n.startswith("stride"))
                )
                specs.append(AotSpec(_rope_kernel, "rope_qkv", label, sig, consts, NUM_WARPS, 1, aligned))
    return specs
