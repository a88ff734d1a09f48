"""LoRA over a frozen NF4 weight: y = x W^T + scale * (x_lora A^T) B^T, fused forward and backward in Triton;
and the frozen NF4 weight alone (`nf4_linear`, no adapter), which still passes the gradient to its input.

Forward: t = x_lora A^T [M, r] is one skinny GEMM; the base GEMM (nf4.py's kernels) adds scale * t B^T in its
epilogue, so the output is written once and W is dequantized once, inside the main loop.

Backward, for dY [M, N]:
    u  = dY B                [M, r]   skinny GEMM
    dX = dY W + scale * u A  [M, K]   `_lora_dx_kernel`: W dequantized on the fly in the main loop, u A in the epilogue
    dA = scale * u^T x_lora  [r, K]
    dB = scale * dY^T t      [N, r]
(with a separate x_lora, dX = dY W and dx_lora = scale * u A.)

Saved for backward vs recomputed (note):
- saved: x_lora (dA needs it; it is the layer input autograd keeps anyway), t = x_lora A^T (M*r elements, r/K of
  x's size; recomputing it would re-read all of x_lora), A and B (parameters, no copy), the NF4 weight (a
  reference to the packed 4-bit tensors, no copy).
- recomputed: the dequantized W. Keeping it from the forward would cost N*K*2 bytes per layer for the whole
  step, the very memory QLoRA exists to save; the backward dequantizes it once more, inside `_lora_dx_kernel`
  (or once into a buffer on the dequant + cuBLAS path), never twice. Nothing else of the forward is kept: the
  base output is never needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import nf4, nf4_cpu
from . import nf4_reference as reference
from ._aot import AotSpec
from ._rowwise import aligned_args
from .backend import INTERPRET, KernelInputError, resolve_backend
from .nf4 import (
    ALIGNED_INTS,
    AOT_DTYPES,
    _grouped_tile,
    _weight_args,
    _weight_signature,
    _weight_tile,
    as_rows,
)
from .nf4_reference import NF4Tensors

# ---- kernels -----------------------------------------------------------------------------------------------------


def _dx_configs() -> list[triton.Config]:
    if INTERPRET:
        # One config in the interpreter (it runs them all); BLOCK_N=128 > N=64 exercises the N mask.
        return [
            triton.Config(
                {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1
            )
        ]
    # BLOCK_K is the output tile along K: 64 = one NF4 block per row of W per tile, one absmax per row.
    # Dropped because they spill on sm_80/sm_90 (the report shows it): 128x64 with 4 warps, 128x128, 64x128.
    return [
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3
        ),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # Small M and blocksize 32.
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


@triton.autotune(
    configs=_dx_configs(),
    key=["M_BUCKET", "N", "K", "HAS_LORA", "blocksize"],  # blocksize: it bounds BLOCK_K (one scale per tile)
    prune_configs_by={"early_config_prune": nf4._prune_by_blocksize},
)
@triton.jit
def _lora_dx_kernel(
    g_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
    u_ptr, a_ptr, dx_ptr, lora_scale,
    M, N, K, blocksize, R, M_BUCKET,
    stride_gm, stride_um, stride_ar, stride_dxm,
    DOUBLE_QUANT: tl.constexpr, HAS_LORA: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dx[M, K] = g[M, N] @ W[N, K] (+ lora_scale * u[M, R] @ A[R, K]). Each program owns a [BLOCK_M, BLOCK_K] tile
    of dx and walks N, dequantizing each [BLOCK_N, BLOCK_K] tile of W in registers."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), K // BLOCK_K, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    rm64 = rm.to(tl.int64)  # int64 row offsets: rm * stride passes 2^31 elements at ~60k rows of a wide GEMM
    g_rows = g_ptr + rm64[:, None] * stride_gm
    k0 = pid_k * BLOCK_K
    dt = g_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    rk = k0 + tl.arange(0, BLOCK_K)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        # Masked columns of g are 0, so the (nonzero) padding rows of the W tile contribute nothing.
        g = tl.load(g_rows + rn[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = _weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, rn, mask_n,
                         k0, K, blocksize, BLOCK_K, DOUBLE_QUANT, dt)  # fmt: skip
        acc = tl.dot(g, w, acc)
    if HAS_LORA:
        for r0 in range(0, R, R_BLOCK):  # R_BLOCK ranks per tl.dot; masked ranks load as zero
            rr = r0 + tl.arange(0, R_BLOCK)
            u = tl.load(u_ptr + rm64[:, None] * stride_um + rr[None, :], mask=mask_m[:, None] & (rr[None, :] < R),
                        other=0.0)  # fmt: skip
            a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :], mask=rr[:, None] < R, other=0.0)
            acc += lora_scale * tl.dot(u, a)
    tl.store(
        dx_ptr + rm64[:, None] * stride_dxm + rk[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=mask_m[:, None],
    )


# ---- launchers ---------------------------------------------------------------------------------------------------


def dx_fused(g2: Tensor, w: NF4Tensors, lora: tuple[Tensor, Tensor, float] | None) -> Tensor:
    m, n = g2.shape
    k = w.shape[1]
    u, a, s = lora if lora is not None else (g2, g2, 0.0)
    r = u.shape[1] if lora is not None else 0
    dx = torch.empty((m, k), dtype=g2.dtype, device=g2.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * (k // meta["BLOCK_K"]),)
    _lora_dx_kernel[grid](
        g2, *_weight_args(w), u, a, dx, float(s),
        m, n, k, w.blocksize, r, triton.next_power_of_2(m),
        g2.stride(0), u.stride(0), a.stride(0), dx.stride(0),
        DOUBLE_QUANT=w.double_quant, HAS_LORA=lora is not None, R_BLOCK=nf4.R_BLOCK,
    )  # fmt: skip
    return dx


def dx_dequant(g2: Tensor, w: NF4Tensors, lora: tuple[Tensor, Tensor, float] | None) -> Tensor:
    """Large-M alternative: dequantize W once into a buffer, then cuBLAS."""
    dx = g2 @ nf4.dequantize_triton(w, g2.dtype)
    if lora is not None:
        u, a, s = lora
        dx.addmm_(u, a, alpha=s)
    return dx


def dx_triton(g2: Tensor, w: NF4Tensors, lora: tuple[Tensor, Tensor, float] | None) -> Tensor:
    m, n = g2.shape
    if m == 0:
        return g2.new_zeros((0, w.shape[1]))
    key = ("dx", triton.next_power_of_2(m), n, w.shape[1], str(g2.dtype), w.double_quant, lora is not None)
    path = nf4.large_m_path(key, lambda: dx_fused(g2, w, lora), lambda: dx_dequant(g2, w, lora))
    return dx_fused(g2, w, lora) if path == "fused" else dx_dequant(g2, w, lora)


def dx_kernel(backend: str) -> Callable[[Tensor, NF4Tensors, tuple[Tensor, Tensor, float] | None], Tensor]:
    """dX = dY W (+ scale * u A) for a resolved backend. Both autograd Functions below take their input gradient
    from here, so a faster dX kernel for a device (a native CPU one) plugs in at this one place."""
    return {"torch": reference.lora_dx, "native": nf4_cpu.dx}.get(backend, dx_triton)


# ---- autograd ----------------------------------------------------------------------------------------------------


class FrozenNF4Function(torch.autograd.Function):
    """y = x W^T for a frozen NF4 W: differentiable in x only. The backward dequantizes W on the fly (the same dX
    kernel as the LoRA backward); nothing of W is saved but the reference to its packed tensors."""

    @staticmethod
    def forward(ctx, x, w, backend):
        x2 = as_rows(x)
        if backend == "native":
            out = nf4_cpu.linear(x2, w)
        else:
            out = reference.matmul_rows(x2, w) if backend == "torch" else nf4.matmul_triton(x2, w)
        ctx.w, ctx.backend, ctx.x_shape = w, backend, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        dx = dx_kernel(ctx.backend)(as_rows(grad_out), ctx.w, None)
        return dx.view(ctx.x_shape), None, None


class LoraLinearFunction(torch.autograd.Function):
    """Inputs x, x_lora (None = x), A, B are differentiable; the NF4 weight is not a tensor and gets no grad."""

    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, w, scale, backend):
        x2 = as_rows(x)
        xl2 = x2 if x_lora is None else as_rows(x_lora)
        # fp32 adapters over bf16 activations: compute in bf16; contiguous because the kernels assume unit stride.
        a, b = lora_a.to(x.dtype).contiguous(), lora_b.to(x.dtype).contiguous()
        t = xl2 @ a.t()
        if backend == "native":
            out = nf4_cpu.linear(x2, w, (t, b, scale))
        elif backend == "torch":
            out = reference.base_plus_lora(x2, w, t, b, scale)
        else:
            out = nf4.matmul_triton(x2, w, (t, b, scale))
        ctx.save_for_backward(xl2, t, lora_a, lora_b)
        ctx.w, ctx.scale, ctx.backend, ctx.same = w, scale, backend, x_lora is None
        ctx.x_shape, ctx.xl_shape = x.shape, (x if x_lora is None else x_lora).shape
        # [M, N]: lora_linear views it as [..., N] outside the Function, so the result is an ordinary autograd view
        # that in-place ops (RoPE on the fused qkv output) may modify; a view made in here could not be.
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xl2, t, lora_a, lora_b = ctx.saved_tensors
        need_x, need_xl, need_a, need_b = ctx.needs_input_grad[:4]
        scale = ctx.scale
        g2 = as_rows(grad_out)
        a, b = lora_a.to(g2.dtype).contiguous(), lora_b.to(g2.dtype).contiguous()
        u = g2 @ b if (need_x and ctx.same) or need_xl or need_a else None
        dx = dxl = da = db = None
        if need_x:
            lora = (u, a, scale) if ctx.same else None
            dx = dx_kernel(ctx.backend)(g2, ctx.w, lora).view(ctx.x_shape)
        if need_xl:
            dxl = (scale * (u @ a)).view(ctx.xl_shape)
        if need_a:
            da = (scale * (u.t() @ xl2)).to(lora_a.dtype)
        if need_b:
            db = (scale * (g2.t() @ t)).to(lora_b.dtype)
        return dx, dxl, da, db, None, None, None


class _NativeDropout(torch.autograd.Function):
    """LoRA dropout through the native kernels (csrc/nf4/dropout.h): the mask is a hash of (seed, index) with the
    seed drawn from torch's generator, kept as one byte per element for the backward."""

    @staticmethod
    def forward(ctx, x, p):
        xc = x.contiguous()
        out = torch.empty_like(xc)
        mask = torch.empty(xc.shape, dtype=torch.uint8)
        seed = int(torch.randint(0, 2**62, (1,)))
        nf4_cpu.dropout_native(xc, out, mask, p, seed)
        ctx.save_for_backward(mask)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        g = grad_out.contiguous()
        out = torch.empty_like(g)
        nf4_cpu.dropout_native_backward(g, mask, out, ctx.p)
        return out, None


def lora_dropout(x: Tensor, p: float) -> Tensor:
    """Training-mode dropout of a LoRA input: each element zeroed with probability p, the rest scaled by 1/(1-p).
    On CPU (float32/bfloat16, native module built) the native kernel draws the mask (torch's own CPU bernoulli
    costs ~60 elementwise ops per element); elsewhere torch's F.dropout. Both follow torch's RNG state."""
    if not 0.0 <= p < 1.0:
        raise KernelInputError(f"dropout p={p}: expected 0 <= p < 1")
    if p == 0.0:
        return x
    if nf4_cpu.supports(x):
        return _NativeDropout.apply(x, float(p))
    return torch.nn.functional.dropout(x, p, training=True)


def lora_linear(
    x: Tensor,
    w: NF4Tensors | Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    *,
    x_lora: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """x W^T + scale * (x_lora A^T) B^T, x_lora defaulting to x; differentiable in x, x_lora, A, B (not W).

    A dense w [N, K] (LoRA over a 16-bit base) runs as plain matmuls on every backend."""
    if isinstance(w, Tensor):
        if w.dim() != 2:
            raise KernelInputError(f"dense w of shape {tuple(w.shape)}: expected (N, K)")
        n, k = w.shape
        reference.check_lora(x, n, k, lora_a, lora_b, x_lora)
        resolve_backend(backend, x.device, x.dtype, gemm=False)  # still reject a bad backend name
        xl = x if x_lora is None else x_lora
        lora = torch.nn.functional.linear(
            torch.nn.functional.linear(xl, lora_a.to(x.dtype)), lora_b.to(x.dtype)
        )
        return torch.nn.functional.linear(x, w.detach().to(x.dtype)) + scale * lora
    n, k = reference.check_weight(w)
    reference.check_lora(x, n, k, lora_a, lora_b, x_lora)
    resolved = _resolve_nf4(backend, x)
    out = LoraLinearFunction.apply(x, x_lora, lora_a, lora_b, w, float(scale), resolved)
    return out.view(*x.shape[:-1], n)


def _resolve_nf4(backend: str, x: Tensor) -> str:
    """The backend for an NF4 GEMM: 'auto' on CPU is the native kernels (LoRA term fused; docs/cpu-inference.md)."""
    resolved = resolve_backend(backend, x.device, x.dtype)
    return "native" if resolved == "torch" and backend == "auto" and nf4_cpu.supports(x) else resolved


def nf4_linear(x: Tensor, w: NF4Tensors, backend: str = "auto") -> Tensor:
    """x [..., K] @ W^T -> [..., N] for a frozen NF4 W, differentiable in x (W gets no gradient): what a projection
    without an adapter runs while layers below it train. Without autograd it is nf4_matmul."""
    n, k = reference.check_weight(w)
    reference.check_input(x, k)
    resolved = _resolve_nf4(backend, x)
    if not (torch.is_grad_enabled() and x.requires_grad):
        if resolved == "native":
            return nf4_cpu.linear(x, w)
        out = reference.nf4_matmul(x, w) if resolved == "torch" else nf4.matmul_triton(as_rows(x), w)
        return out.view(*x.shape[:-1], n)
    # [M, N] from the Function, viewed outside it: an ordinary autograd view that in-place ops may modify.
    return FrozenNF4Function.apply(x, w, resolved).view(*x.shape[:-1], n)


# ---- AOT specs ---------------------------------------------------------------------------------------------------


def aot_specs() -> list[AotSpec]:
    """The dx kernel in every (dtype, double quant, LoRA epilogue, tile config) the launcher can pick on a GPU."""
    specs = []
    kernel = _lora_dx_kernel.fn
    for dq in (True, False):
        for dname, ptr in AOT_DTYPES.items():
            for lora in (False, True):
                sig = {
                    "g_ptr": ptr, **_weight_signature(dq), "u_ptr": ptr, "a_ptr": ptr, "dx_ptr": ptr,
                    "lora_scale": "fp32", "M": "i32", "N": "i32", "K": "i32", "blocksize": "i32", "R": "i32",
                    "M_BUCKET": "i32", "stride_gm": "i32", "stride_um": "i32", "stride_ar": "i32", "stride_dxm": "i32",
                }  # fmt: skip
                sig = {name: sig[name] for name in kernel.arg_names if name in sig}
                for c in _dx_configs():
                    cfg = ",".join(f"{key}={v}" for key, v in c.kwargs.items())
                    label = f"{dname},dq={int(dq)},lora={int(lora)},{cfg},w={c.num_warps},s={c.num_stages}"
                    consts = {"DOUBLE_QUANT": dq, "HAS_LORA": lora, "R_BLOCK": nf4.R_BLOCK, **c.kwargs}
                    specs.append(
                        AotSpec(
                            kernel,
                            "lora_dx",
                            label,
                            sig,
                            consts,
                            c.num_warps,
                            c.num_stages,
                            aligned_args(sig, ALIGNED_INTS),
                        )
                    )
    return specs
