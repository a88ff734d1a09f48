"""SwiGLU over the fused gate_up projection output, in Triton: out = silu(gate) * up.

gate_up [..., 2I] holds gate in its FIRST half and up in the second (Phi-3's fused gate_up_proj). fp32 math,
rounded once on store. Backward, with s = sigmoid(gate):
    d_up   = dy * gate * s
    d_gate = dy * up * s * (1 + gate * (1 - s))
Saved for backward: gate_up only (the layer's projection output, which the backward needs anyway); silu(gate) and
the product are recomputed in the backward kernel instead of being kept for the whole step ([tokens, I] each).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _rowwise, nf4_cpu
from ._aot import AotSpec
from .backend import INTERPRET, KernelInputError

# 1024 columns per program with 4 warps: 8 fp32 values of each live array per thread (one 16-byte bf16 vector).
# A Phi-3 row (I = 8192 or 17920) spans 8 or 18 programs; the interpreter uses 64, so width 130 spans three programs, the last one masked.
BLOCK = 1024
NUM_WARPS = 4
INTERPRET_BLOCK = 64


# ---- kernels -----------------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd_kernel(gu_ptr, out_ptr, n_cols, stride_gu, stride_out, BLOCK_I: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < n_cols
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr, gu_ptr, dgu_ptr, n_cols, stride_dy, stride_gu, stride_dgu, BLOCK_I: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    d_up = dy * gate * s
    d_gate = dy * up * s * (1.0 + gate * (1.0 - s))
    ty = dgu_ptr.dtype.element_ty
    tl.store(dgu_ptr + row * stride_dgu + cols, d_gate.to(ty), mask=mask)
    tl.store(dgu_ptr + row * stride_dgu + n_cols + cols, d_up.to(ty), mask=mask)


# ---- launchers ---------------------------------------------------------------------------------------------------


def block_size(interpret: bool = INTERPRET) -> int:
    return INTERPRET_BLOCK if interpret else BLOCK


def forward_triton(gu2: Tensor) -> Tensor:
    m, i = gu2.shape[0], gu2.shape[1] // 2
    out = torch.empty((m, i), dtype=gu2.dtype, device=gu2.device)
    if m and i:
        bi = block_size()
        _swiglu_fwd_kernel[(m, triton.cdiv(i, bi))](
            gu2, out, i, gu2.stride(0), out.stride(0), BLOCK_I=bi, num_warps=NUM_WARPS
        )
    return out


def backward_triton(dy2: Tensor, gu2: Tensor) -> Tensor:
    m, i = dy2.shape
    dgu = torch.empty((m, 2 * i), dtype=gu2.dtype, device=gu2.device)
    if m and i:
        bi = block_size()
        _swiglu_bwd_kernel[(m, triton.cdiv(i, bi))](
            dy2, gu2, dgu, i, dy2.stride(0), gu2.stride(0), dgu.stride(0), BLOCK_I=bi, num_warps=NUM_WARPS
        )
    return dgu


# ---- torch reference and autograd --------------------------------------------------------------------------------


def swiglu_reference(gate_up: Tensor) -> Tensor:
    """The CPU runtime path and the tests' oracle: transformers' Phi3MLP math, up * silu(gate), op for op."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * torch.nn.functional.silu(gate)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gu2 = _rowwise.unit_stride_rows(gate_up)
        out = forward_triton(gu2)
        ctx.save_for_backward(gu2)
        ctx.shape = gate_up.shape
        return out.view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        (gu2,) = ctx.saved_tensors
        return backward_triton(_rowwise.unit_stride_rows(dy), gu2).view(ctx.shape)


def swiglu(gate_up: Tensor, backend: str = "auto") -> Tensor:
    """silu(gate) * up for gate_up [..., 2I] = [gate | up] -> [..., I]; differentiable in gate_up."""
    _rowwise.check_float(gate_up, "gate_up")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise KernelInputError(
            f"gate_up of shape {tuple(gate_up.shape)}: the last dimension must be even ([gate | up], 2 * I)"
        )
    if _rowwise.resolve(backend, gate_up) == "torch":
        if backend == "auto" and nf4_cpu.rowwise_ok(gate_up):  # CPU inference: one native pass
            return nf4_cpu.swiglu(gate_up)
        return swiglu_reference(gate_up)
    return SwiGLUFunction.apply(gate_up)


# ---- AOT specs ---------------------------------------------------------------------------------------------------


def aot_specs() -> list[AotSpec]:
    """Forward and backward for the GPU activation dtypes (one block size serves every width)."""
    specs = []
    bi = block_size(interpret=False)
    for dname, ptr in _rowwise.AOT_DTYPES.items():
        cfg = f"{dname},BLOCK_I={bi},w={NUM_WARPS}"
        sig = {"gu_ptr": ptr, "out_ptr": ptr, "n_cols": "i32", "stride_gu": "i32", "stride_out": "i32"}
        # I = 8192 or 17920 and the row strides are multiples of 16 on Phi-3: aligned as the JIT sees them.
        aligned = _rowwise.aligned_args(sig, tuple(n for n in sig if not n.endswith("_ptr")))
        specs.append(
            AotSpec(_swiglu_fwd_kernel, "swiglu_fwd", cfg, sig, {"BLOCK_I": bi}, NUM_WARPS, 1, aligned)
        )
        sig = {"dy_ptr": ptr, "gu_ptr": ptr, "dgu_ptr": ptr, "n_cols": "i32", "stride_dy": "i32", "stride_gu": "i32",
               "stride_dgu": "i32"}  # fmt: skip
        aligned = _rowwise.aligned_args(sig, tuple(n for n in sig if not n.endswith("_ptr")))
        specs.append(
            AotSpec(_swiglu_bwd_kernel, "swiglu_bwd", cfg, sig, {"BLOCK_I": bi}, NUM_WARPS, 1, aligned)
        )
    return specs
