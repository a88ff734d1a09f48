"""RMSNorm forward and backward in Triton: y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype).

Semantics are exactly phi3fast.model.RMSNorm's (and transformers' Phi3RMSNorm): normalize in fp32, round the
normalized row to x's dtype, then multiply by the weight (the product rounds once to the promoted dtype). All math
inside the kernels is fp32 whatever the activation dtype.

Saved for backward: x, weight and the per-row inverse RMS (fp32, one number per row); the normalized row is
recomputed from them. Backward, per row with xhat = x * rstd and dn = dy * weight:
    dx = rstd * (dn - xhat * mean(dn * xhat))
    dW = sum over rows of dy * xhat.to(x.dtype)
dW is reduced in two stages: a persistent grid of programs (two per SM) each walks a contiguous share of the rows
and keeps an fp32 partial sum in registers, written once to a [programs, H] buffer; torch then sums the buffer
over programs. No atomics, so the result is deterministic, and the buffer is a few MB at most.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _rowwise, nf4_cpu
from ._aot import AotSpec
from .backend import KernelInputError

# ---- kernels -----------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, H, stride_x, stride_y, eps, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """One row per program: rstd = 1/sqrt(mean(x^2) + eps) in fp32, y = w * (x * rstd).to(x.dtype)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    tl.store(rstd_ptr + row, rstd)
    # Round the normalized row to x's dtype first (the model's semantics), then one fp32 product per element:
    # exact for 16-bit operands, so the single rounding on store matches torch's 16-bit multiply.
    xhat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * xhat).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    M, H, rows_per_program, stride_dy, stride_x, stride_dx,
    COMPUTE_DW: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Program p owns rows [p * rows_per_program, (p + 1) * rows_per_program): dx of each, and (COMPUTE_DW) the
    fp32 partial sum of dy * xhat over them, stored in row p of dw_partial [programs, H]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for row in range(first, last):
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        dn = dy * w
        dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / H))
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            # The forward multiplied the weight by xhat rounded to x's dtype: the weight's gradient sees that value.
            dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * H + cols, dw, mask=mask)


# ---- launchers ---------------------------------------------------------------------------------------------------


def forward_triton(x2: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(y [M, H] in out_dtype, rstd [M] fp32) for x2 [M, H] with unit stride along H."""
    m, h = x2.shape
    y = torch.empty((m, h), dtype=out_dtype, device=x2.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m:
        block, warps = _rowwise.block_and_warps(h)
        _rms_norm_fwd_kernel[(m,)](
            x2, weight, y, rstd, h, x2.stride(0), y.stride(0), float(eps), BLOCK_H=block, num_warps=warps
        )
    return y, rstd


def backward_triton(
    dy2: Tensor, x2: Tensor, weight: Tensor, rstd: Tensor, need_dw: bool
) -> tuple[Tensor, Tensor | None]:
    """(dx [M, H] in x's dtype, dW [H] in weight's dtype or None)."""
    m, h = x2.shape
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    programs = max(min(_rowwise.num_programs(x2.device), m), 1)
    rows_per_program = triton.cdiv(m, programs)
    programs = (
        triton.cdiv(m, rows_per_program) if m else 1
    )  # no program without rows (its partial would be 0)
    dw_partial = torch.zeros((programs, h), dtype=torch.float32, device=x2.device) if need_dw else rstd
    if m:
        block, warps = _rowwise.block_and_warps(h)
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd, dx, dw_partial,
            m, h, rows_per_program, dy2.stride(0), x2.stride(0), dx.stride(0),
            COMPUTE_DW=need_dw, BLOCK_H=block, num_warps=warps,
        )  # fmt: skip
    dw = dw_partial.sum(0).to(weight.dtype) if need_dw else None  # stage 2: sum of the per-program partials
    return dx, dw


# ---- torch reference and autograd --------------------------------------------------------------------------------


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The CPU runtime path and the tests' oracle: phi3fast.model.RMSNorm's math, op for op."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _rowwise.unit_stride_rows(x)
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        y, rstd = forward_triton(x2, weight.contiguous(), eps, out_dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx, dw = backward_triton(_rowwise.unit_stride_rows(dy), x2, weight.contiguous(), rstd, need_dw)
        return (dx.view(ctx.x_shape) if need_dx else None), dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float, backend: str = "auto") -> Tensor:
    """weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype); differentiable in x and weight."""
    _rowwise.check_float(x, "x")
    _rowwise.check_float(weight, "weight")
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise KernelInputError(
            f"weight of shape {tuple(weight.shape)} must be ({x.shape[-1] if x.dim() else '?'},): the last "
            f"dimension of x of shape {tuple(x.shape)}"
        )
    if weight.device != x.device:
        raise KernelInputError(f"weight is on {weight.device}, x on {x.device}")
    if not eps > 0:
        raise KernelInputError(f"eps={eps!r}: expected a positive number")
    if _rowwise.resolve(backend, x) == "torch":
        if backend == "auto" and nf4_cpu.rowwise_ok(x, weight):  # CPU inference: one native pass
            return nf4_cpu.rms_norm(x, weight, eps)
        return rms_norm_reference(x, weight, eps)
    return RMSNormFunction.apply(x, weight, float(eps))


# ---- AOT specs ---------------------------------------------------------------------------------------------------

# Row widths the launchers see on Phi-3: hidden 3072 (mini) and 5120 (medium), plus a small one.
AOT_WIDTHS = (3072, 5120, 130)


def aot_specs() -> list[AotSpec]:
    """Forward and backward (with and without dW) for the GPU activation dtypes at Phi-3's hidden sizes, with the
    alignment the JIT specializes at those sizes (16-byte vector loads; none at the odd width 130)."""
    specs = []
    for dname, ptr in _rowwise.AOT_DTYPES.items():
        for h in AOT_WIDTHS:
            block, warps = _rowwise.block_and_warps(h)
            sig = {"x_ptr": ptr, "w_ptr": ptr, "y_ptr": ptr, "rstd_ptr": "*fp32", "H": "i32",
                   "stride_x": "i32", "stride_y": "i32", "eps": "fp32"}  # fmt: skip
            cfg = f"{dname},BLOCK_H={block},w={warps}"
            ints = ("H", "stride_x", "stride_y", "stride_dy", "stride_dx") if h % 16 == 0 else ()
            aligned = _rowwise.aligned_args(sig, ints)
            specs.append(
                AotSpec(_rms_norm_fwd_kernel, "rms_norm_fwd", cfg, sig, {"BLOCK_H": block}, warps, 1, aligned)
            )
            for dw in (True, False):
                sig = {"dy_ptr": ptr, "x_ptr": ptr, "w_ptr": ptr, "rstd_ptr": "*fp32", "dx_ptr": ptr,
                       "dw_partial_ptr": "*fp32", "M": "i32", "H": "i32", "rows_per_program": "i32",
                       "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32"}  # fmt: skip
                consts = {"COMPUTE_DW": dw, "BLOCK_H": block}
                label = f"{dname},dw={int(dw)},BLOCK_H={block},w={warps}"
                aligned = _rowwise.aligned_args(sig, ints)
                specs.append(
                    AotSpec(_rms_norm_bwd_kernel, "rms_norm_bwd", label, sig, consts, warps, 1, aligned)
                )
    return specs
