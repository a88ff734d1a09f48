"""The NF4 ops on CPU through the native kernels (csrc/nf4): x W^T with the LoRA term fused, and dY W.

What they compute is what reference.py computes (the torch path, `_tiled_gemm`), with fp32 accumulation and
activations in float32 or bfloat16; W is read as packed 4-bit codes and double-quantized scales, a panel at a
time, never dequantized whole. The kernels pick AVX-512, AVX2 or scalar code at run time (PHI3FAST_SIMD caps it;
`simd=` forces a level for tests) and run on `threads` threads (default: torch.get_num_threads(), or the count
pinned by `pinned_threads`) with the GIL released.

Weight views: each NF4Weight's tensor addresses and sizes are packed once into a native NF4View, cached per
weight object (weakly: the cache never keeps a weight alive) together with the tensors it points into.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import nf4_reference as reference
from .backend import KernelInputError

if TYPE_CHECKING:
    from .nf4_reference import NF4Tensors as NF4Weight

try:
    import phi3fast._hnsw as _native  # the compiled module: the one import kernels/ may make outside itself
except ImportError:  # the package without its compiled module: the torch reference runs instead
    _native = None

CPU_DTYPES = (torch.float32, torch.bfloat16)  # the activation dtypes the native kernels take
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def available() -> bool:
    """True when the native module carries the NF4 kernels."""
    return _native is not None and hasattr(_native, "nf4_linear")


def supports(x: Tensor) -> bool:
    """Whether the native kernels take activations like x (CPU, float32 or bfloat16)."""
    return available() and x.device.type == "cpu" and x.dtype in CPU_DTYPES


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def weight_view(w: NF4Weight):
    """The cached native NF4View of w (checked with reference.check_weight once)."""
    entry = _VIEWS.get(w)
    if entry is None:
        n, k = reference.check_weight(w)
        if w.packed.device.type != "cpu":
            raise KernelInputError(f"the NF4 CPU kernels need a CPU weight, got one on {w.packed.device}")
        packed = w.packed.detach().reshape(-1).contiguous()
        if w.double_quant:
            assert w.nested_code is not None and w.nested_absmax is not None and w.offset is not None
            absmax = w.absmax.detach().reshape(-1).to(torch.uint8).contiguous()
            nested_code, nested_absmax = _f32(w.nested_code), _f32(w.nested_absmax)
            offset = float(w.offset)
        else:
            absmax = _f32(w.absmax).reshape(-1)
            nested_code = nested_absmax = absmax  # never read without double quantization
            offset = 0.0
        view = _native.NF4View(
            packed.data_ptr(), absmax.data_ptr(), w.double_quant, nested_code.data_ptr(),
            nested_absmax.data_ptr(), offset, w.code.float().tolist(), n, k, w.blocksize,
        )  # fmt: skip
        entry = (view, (packed, absmax, nested_code, nested_absmax))
        try:
            _VIEWS[w] = entry
        except TypeError:  # an NF4 tensor holder that cannot be weakly referenced: a view per call
            pass
    return entry[0]


def _rows(x: Tensor, k: int, name: str) -> Tensor:
    reference.check_input(x, k, name)
    if x.device.type != "cpu" or x.dtype not in CPU_DTYPES:
        raise KernelInputError(
            f"{name}: the NF4 CPU kernels take float32 or bfloat16 CPU tensors, got {x.dtype} on {x.device}"
        )
    return x.detach().reshape(-1, k).contiguous()


_THREADS: list[int] = []  # a stack of thread counts pinned by `pinned_threads`


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run the native kernels on `threads` threads inside the block, whatever torch's intra-op setting is.

    The decode loop runs torch's own small ops on one thread (an OpenMP region per tiny op waits for descheduled
    workers on a busy machine) while the native kernels keep every core on their own pool."""
    _THREADS.append(int(threads))
    try:
        yield
    finally:
        _THREADS.pop()


@contextmanager
def full_threads() -> Iterator[None]:
    """Inside `pinned_threads` with torch on fewer threads: torch's ops on the pinned count for the block.

    For one large torch op in a loop whose small ops run on one thread (prefill's attention over a long prompt, a
    training step's lm_head GEMMs): one OpenMP region per large op costs nothing next to its work. Elsewhere a
    no-op."""
    if not _THREADS or torch.get_num_threads() >= _THREADS[-1]:
        yield
        return
    inner = torch.get_num_threads()
    torch.set_num_threads(_THREADS[-1])
    try:
        yield
    finally:
        torch.set_num_threads(inner)


COMPUTES = ("fp32", "bf16")
_COMPUTE: list[str] = []  # a stack of compute modes set by `compute_mode`


@contextmanager
def compute_mode(mode: str) -> Iterator[None]:
    """Products of the large-M NF4 GEMMs (M > 16 forward, every dX) inside the block: 'fp32' (the default) or
    'bf16' (AVX512-BF16: operands rounded to bf16, fp32 sums; |error| <= 2^-8 sum |a w|; fp32 where the CPU or
    the PHI3FAST_SIMD cap lacks it). Outside any block, PHI3FAST_NF4_COMPUTE sets it. Decode's GEMV is fp32."""
    if mode not in COMPUTES:
        raise KernelInputError(f"compute mode {mode!r}: expected one of {', '.join(map(repr, COMPUTES))}")
    _COMPUTE.append(mode)
    try:
        yield
    finally:
        _COMPUTE.pop()


def _compute(compute: str | None) -> str:
    mode = compute or (_COMPUTE[-1] if _COMPUTE else os.environ.get("PHI3FAST_NF4_COMPUTE", "fp32"))
    if mode not in COMPUTES:
        raise KernelInputError(
            f"compute mode {mode!r} (PHI3FAST_NF4_COMPUTE or compute=): expected one of "
            + ", ".join(map(repr, COMPUTES))
        )
    return mode


def bf16_compute_supported() -> bool:
    """Whether compute mode 'bf16' runs bf16 products here (AVX512-BF16), rather than falling back to fp32."""
    return (
        available()
        and hasattr(_native, "nf4_bf16_compute_supported")
        and _native.nf4_bf16_compute_supported()
    )


def _threads(threads: int | None) -> int:
    if threads is not None:
        return int(threads)
    return _THREADS[-1] if _THREADS else torch.get_num_threads()


def linear(
    x: Tensor,
    w: NF4Weight,
    lora: tuple[Tensor, Tensor, float] | None = None,
    *,
    simd: str | None = None,
    threads: int | None = None,
    compute: str | None = None,
) -> Tensor:
    """x [..., K] W^T (+ scale * t B^T with lora = (t [..., r], B [N, r], scale)) -> [..., N] in x's dtype.
    compute: 'fp32' or 'bf16' (see compute_mode; None: the current mode)."""
    return _launch("nf4_linear", x, w, lora, True, simd, threads, compute)


def dx(
    g: Tensor,
    w: NF4Weight,
    lora: tuple[Tensor, Tensor, float] | None = None,
    *,
    simd: str | None = None,
    threads: int | None = None,
    compute: str | None = None,
) -> Tensor:
    """dY [..., N] W (+ scale * u A with lora = (u [..., r], A [r, K], scale)) -> [..., K] in dY's dtype.
    compute: 'fp32' or 'bf16' (see compute_mode; None: the current mode)."""
    return _launch("nf4_dx", g, w, lora, False, simd, threads, compute)


def _launch(
    op: str,
    x: Tensor,
    w: NF4Weight,
    lora: tuple[Tensor, Tensor, float] | None,
    forward: bool,
    simd: str | None,
    threads: int | None,
    compute: str | None,
) -> Tensor:
    """The shared body of linear (forward: x [..., K] -> [..., N]) and dx (dY [..., N] -> [..., K]): operand
    checks, the output, the LoRA term's pointers. The LoRA factor is B [N, r] forward and A [r, K] for dx."""
    view = weight_view(w)
    n, k = view.n, view.k
    d_in, d_out = (k, n) if forward else (n, k)
    x2 = _rows(x, d_in, "x" if forward else "dY")
    m = x2.shape[0]
    # Allocated in its final shape (the same memory as [M, N]): a view made here could not be modified in place
    # when an autograd Function returns it (RoPE on the qkv output).
    out = torch.empty((*x.shape[:-1], d_out), dtype=x.dtype)
    t_ptr = f_ptr = r = 0
    scale = 0.0
    if lora is not None:
        t, f, scale = lora
        r = (f.shape[1] if forward else f.shape[0]) if f.dim() == 2 else -1
        f_ok = f.dim() == 2 and (f.shape[0] == n if forward else f.shape[1] == k)
        if not f_ok or t.shape[-1] != r or t.numel() != m * r:
            tn, fn, want = ("t", "B", f"B [N={n}, r]") if forward else ("u", "A", f"A [r, K={k}]")
            raise KernelInputError(
                f"LoRA operands {tn} {tuple(t.shape)} and {fn} {tuple(f.shape)}: expected {tn} [..., r] with "
                f"M={m} rows and {want}"
            )
        t, f = _f32(t).reshape(m, r), _f32(f)
        t_ptr, f_ptr = t.data_ptr(), f.data_ptr()
    getattr(_native, op)(
        view, x2.data_ptr(), _NAMES[x2.dtype], m, out.data_ptr(), _NAMES[out.dtype], t_ptr, f_ptr, r,
        float(scale), simd, _threads(threads), _compute(compute),
    )  # fmt: skip
    return out


def dense_linear(x: Tensor, weight: Tensor, *, simd: str | None = None, threads: int | None = None) -> Tensor:
    """x [..., K] W^T for a dense CPU weight W [N, K] (float32 or bfloat16), fp32 accumulation, in x's dtype.

    Meant for small M (decode's lm_head); large M belongs to torch's GEMM."""
    if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype not in CPU_DTYPES:
        raise KernelInputError(
            f"weight: expected a 2-D float32/bfloat16 CPU tensor, got {tuple(weight.shape)} {weight.dtype} "
            f"on {weight.device}"
        )
    n, k = weight.shape
    x2 = _rows(x, k, "x")
    w = weight.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype)
    _native.dense_linear(
        w.data_ptr(), _NAMES[w.dtype], n, k, x2.data_ptr(), _NAMES[x2.dtype], m, out.data_ptr(),
        _NAMES[out.dtype], simd, _threads(threads),
    )  # fmt: skip
    return out.view(*x.shape[:-1], n)


def dropout_native(x: Tensor, out: Tensor, mask: Tensor, p: float, seed: int) -> None:
    """out = x * keep / (1 - p), mask = keep (uint8), keep a hash of (seed, index): contiguous CPU tensors."""
    _native.dropout_forward(
        x.data_ptr(), out.data_ptr(), mask.data_ptr(), _NAMES[x.dtype], x.numel(), p, seed, _threads(None)
    )


def dropout_native_backward(g: Tensor, mask: Tensor, out: Tensor, p: float) -> None:
    """out = g * mask / (1 - p): contiguous CPU tensors."""
    _native.dropout_backward(
        g.data_ptr(), mask.data_ptr(), out.data_ptr(), _NAMES[g.dtype], g.numel(), p, _threads(None)
    )


# ---- row-wise ops of a decode step (no autograd: the callers use them only when no gradient is needed) ----------


def rowwise_ok(*tensors: Tensor) -> bool:
    """Whether the native row-wise ops can take these tensors: CPU, one float32/bfloat16 dtype, no grad needed."""
    if not available() or not tensors:
        return False
    dtype = tensors[0].dtype
    return dtype in CPU_DTYPES and all(
        t.device.type == "cpu" and t.dtype == dtype and not (t.requires_grad and torch.is_grad_enabled())
        for t in tensors
    )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dimension (kernels/rmsnorm.py's reference math)."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h).contiguous()
    w = weight.contiguous()
    out = torch.empty_like(x2)
    _native.rms_norm_rows(
        x2.data_ptr(), w.data_ptr(), out.data_ptr(), _NAMES[x.dtype], x2.shape[0], h, float(eps)
    )
    return out.view(x.shape)


def swiglu(gate_up: Tensor) -> Tensor:
    """up * silu(gate) for gate_up [..., 2I] = [gate | up]."""
    width = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * width).contiguous()
    out = gu.new_empty((gu.shape[0], width))
    _native.swiglu_rows(gu.data_ptr(), out.data_ptr(), _NAMES[gu.dtype], gu.shape[0], width)
    return out.view(*gate_up.shape[:-1], width)


def rope_qkv_(qkv: Tensor, cos: Tensor, sin: Tensor, n_rot_heads: int) -> Tensor:
    """Rotate the first n_rot_heads heads of qkv [B, T, heads * D] in place by cos/sin [B, T, D/2]."""
    b, t, width = qkv.shape
    half = cos.shape[-1]
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    _native.rope_rows(
        qkv.data_ptr(), _NAMES[qkv.dtype], b, t, width, n_rot_heads, half, cos.data_ptr(), sin.data_ptr(),
        _NAMES[cos.dtype], cos.stride(0), cos.stride(1),
    )  # fmt: skip
    return qkv
