"""NF4 dequantization and dequant-fused matmul (x @ W^T) in Triton.

Size (note): past ~400 lines because it is one op family (dequantize, fused matmul, small-M matmul) whose tile
helpers lora.py's dX kernel reuses; split, a kernel would sit apart from its launcher and its AOT specs.

Layout (bitsandbytes'): `packed` holds W[N, K] row-major, element 2i in the high nibble of byte i and 2i+1 in the
low nibble; one absmax per `blocksize` consecutive elements. Since K % blocksize == 0, a K-tile of width
BLOCK_K <= blocksize (blocksize % BLOCK_K == 0) sits inside one absmax block per row of W, so a tile needs one scale
per row, loaded once.

Nibble order (note): a byte holds W[n, k] (high nibble) and W[n, k+1] (low). `_dequant_tile` decodes both halves
and interleaves them back (tl.join + reshape) into a row-ordered [BLOCK_N, BLOCK_K] tile, so the activations are
read as contiguous rows (vectorized, pipelined loads) and each K-tile is one full-width tl.dot.

Paths of nf4_matmul on CUDA (the rule):
- M <= 16 (decode): `_nf4_matmul_small_m_kernel`, split-K over the weight so that enough programs stream it;
  memory-bound, so it reads each packed byte exactly once.
- M > 16: the fused kernel (`_nf4_matmul_kernel`) re-dequantizes each weight tile once per M-tile, which is free
  while the GEMM is memory-bound and costs ALU time once it is compute-bound; dequantizing once into a 16-bit
  buffer and calling cuBLAS costs 4 extra bytes of traffic per weight. Which one wins depends on the GPU, so
  `large_m_path` times both once per (M bucket, N, K, dtype) on the first call and caches the winner; set
  LARGE_M_PATH to 'fused' or 'dequant' to force one. bench/kernel_ops.py prints both for every shape.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import nf4_cpu
from . import nf4_reference as reference
from ._aot import AotSpec
from .backend import GPU_DTYPES, INTERPRET, pointer_type, resolve_backend
from .nf4_reference import NF4Tensors

SMALL_M = 16  # rows up to which the decode kernel runs: one 16-row tile, the smallest tl.dot M
R_BLOCK = 16  # LoRA ranks per epilogue tl.dot: 16 is tl.dot's smallest K; larger ranks loop, so one compile serves all


# ---- kernels -----------------------------------------------------------------------------------------------------


@triton.jit
def _block_scale(
    absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blk, mask, DOUBLE_QUANT: tl.constexpr
):
    """fp32 absmax of blocks `blk`; double quant decodes nested_code[q] * nested_absmax[blk // 256] + offset."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + blk // 256, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + q) * nested + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _dequant_tile(packed_ptr, code_ptr, scale, rn, mask_n, k0, K, BLOCK_K: tl.constexpr, dt: tl.constexpr):
    """W[rn, k0:k0 + BLOCK_K] in dtype dt, [BLOCK_N, BLOCK_K]: load BLOCK_K/2 bytes per row, decode both nibbles
    (code * absmax in fp32, one rounding), interleave (high nibble = even column) back into row order."""
    rj = tl.arange(0, BLOCK_K // 2)
    byte = tl.load(packed_ptr + (rn[:, None] * K + k0) // 2 + rj[None, :], mask=mask_n[:, None], other=0)
    byte = byte.to(tl.int32)
    hi = (tl.load(code_ptr + (byte >> 4)) * scale[:, None]).to(dt)
    lo = (tl.load(code_ptr + (byte & 15)) * scale[:, None]).to(dt)
    return tl.reshape(tl.join(hi, lo), [rn.shape[0], BLOCK_K])


@triton.jit
def _weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, rn, mask_n, k0,
                 K, blocksize, BLOCK_K: tl.constexpr, DOUBLE_QUANT: tl.constexpr, dt: tl.constexpr):  # fmt: skip
    """W[rn, k0:k0 + BLOCK_K] in dtype dt; the tile lies in one absmax block per row, so one scale per row."""
    scale = _block_scale(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, (rn * K + k0) // blocksize,
                         mask_n, DOUBLE_QUANT)  # fmt: skip
    return _dequant_tile(packed_ptr, code_ptr, scale, rn, mask_n, k0, K, BLOCK_K, dt)


@triton.jit
def _grouped_tile(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M consecutive M-tiles share each weight tile while it is in L2."""
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_size
    pid_n = (pid % (GROUP_M * grid_n)) // group_size
    return pid_m, pid_n


@triton.jit
def _lora_up(t_ptr, b_ptr, rm, rn, mask_m, mask_n, R, stride_tm, stride_bn,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_BLOCK: tl.constexpr):  # fmt: skip
    """t[rm, :R] @ B[rn, :R]^T as fp32 [BLOCK_M, BLOCK_N], R_BLOCK ranks per tl.dot (any rank, one compile)."""
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, R_BLOCK):
        rr = r0 + tl.arange(0, R_BLOCK)
        t = tl.load(
            t_ptr + rm[:, None] * stride_tm + rr[None, :], mask=mask_m[:, None] & (rr[None, :] < R), other=0.0
        )
        bt = tl.load(
            b_ptr + rn[None, :] * stride_bn + rr[:, None], mask=mask_n[None, :] & (rr[:, None] < R), other=0.0
        )
        up = tl.dot(t, bt, up)
    return up


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, out_ptr,
    n_bytes, blocksize,
    DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Element-wise: each program turns BLOCK packed bytes into 2*BLOCK contiguous outputs."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = _block_scale(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, (2 * offs) // blocksize, mask,
                         DOUBLE_QUANT)  # fmt: skip
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 15)) * scale
    # Interleave (hi, lo) pairs so one contiguous store writes 2*BLOCK elements.
    vals = tl.reshape(tl.join(hi, lo), [2 * BLOCK])
    outs = 2 * tl.program_id(0) * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + outs, vals.to(out_ptr.dtype.element_ty), mask=outs < 2 * n_bytes)


def _matmul_configs() -> list[triton.Config]:
    if INTERPRET:
        # The interpreter runs every autotune config: one small config keeps tests fast and still exercises
        # several M/N tiles, the M and N masks (BLOCK_N=128 > N=64) and two K-tiles per absmax block.
        return [
            triton.Config(
                {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1
            )
        ]
    # 64: one NF4 block per K-tile (Phi-3's blocksize), so each row's absmax is loaded once per tile.
    # 8 warps for the 128-wide tiles: with 4 warps (or a 128x128 tile) the dequantized [BLOCK_N, 32] fp32 halves
    # push past 255 registers and spill on sm_80 (see `python -m phi3fast.kernels.report`).
    return [
        # 2 stages: with 3, the fp32-absmax variant spills 8 bytes on sm_80 (255 registers; the report shows it).
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=2
        ),
        triton.Config(
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3
        ),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # Medium M (17..64) and blocksize 32 (BLOCK_K must divide the blocksize).
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


def _prune_by_blocksize(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep configs whose BLOCK_K divides the blocksize (one absmax per row of a tile)."""
    bs = named_args["blocksize"]
    kept = [c for c in configs if bs % c.kwargs["BLOCK_K"] == 0]
    if not kept:
        raise ValueError(
            f"no matmul config fits blocksize {bs}"
        )  # check_weight rules out blocksizes below 32
    return kept


@triton.autotune(
    configs=_matmul_configs(),
    key=["M_BUCKET", "N", "K", "HAS_LORA"],
    prune_configs_by={"early_config_prune": _prune_by_blocksize},
)
@triton.jit
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
    t_ptr, b_ptr, out_ptr, lora_scale,
    M, N, K, blocksize, R, M_BUCKET,
    stride_xm, stride_tm, stride_bn, stride_om,
    DOUBLE_QUANT: tl.constexpr, HAS_LORA: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[M, N] = x[M, K] @ W^T (+ lora_scale * t[M, R] @ B[N, R]^T in the epilogue, with t = x_lora A^T)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rk = tl.arange(0, BLOCK_K)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=mask_m[:, None], other=0.0)
        w = _weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, rn, mask_n,
                         k0, K, blocksize, BLOCK_K, DOUBLE_QUANT, dt)  # fmt: skip
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_LORA:
        acc += lora_scale * _lora_up(t_ptr, b_ptr, rm, rn, mask_m, mask_n, R, stride_tm, stride_bn, BLOCK_M, BLOCK_N,
                                     R_BLOCK)  # fmt: skip
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


@triton.jit
def _nf4_matmul_small_m_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
    t_ptr, b_ptr, out_ptr, lora_scale,
    M, N, K, blocksize, R, TILES_PER_SPLIT,
    stride_xm, stride_tm, stride_bn, stride_os, stride_om,
    DOUBLE_QUANT: tl.constexpr, HAS_LORA: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Decode (M <= 16): program (n, s) reads weight rows n*BLOCK_N.. over K-split s once and writes fp32 partial
    sums to out[s] (summed by the launcher: deterministic, unlike atomics). Split 0 adds the LoRA term."""
    BLOCK_M: tl.constexpr = 16  # all rows in one tile: tl.dot's minimum M
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rk = tl.arange(0, BLOCK_K)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.minimum((pid_s + 1) * TILES_PER_SPLIT, K // BLOCK_K) * BLOCK_K
    for k0 in range(pid_s * TILES_PER_SPLIT * BLOCK_K, k_end, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=mask_m[:, None], other=0.0)
        w = _weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, rn, mask_n,
                         k0, K, blocksize, BLOCK_K, DOUBLE_QUANT, dt)  # fmt: skip
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_LORA:
        up = _lora_up(
            t_ptr, b_ptr, rm, rn, mask_m, mask_n, R, stride_tm, stride_bn, BLOCK_M, BLOCK_N, R_BLOCK
        )
        acc += tl.where(pid_s == 0, lora_scale, 0.0) * up
    tl.store(out_ptr + pid_s * stride_os + rm[:, None] * stride_om + rn[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


# ---- launchers ---------------------------------------------------------------------------------------------------


def _weight_args(w: NF4Tensors) -> tuple[Tensor, ...]:
    """Pointers the kernels read; without double quant the nested slots get absmax (never read)."""
    if w.double_quant:
        return (w.packed, w.absmax, w.code, w.nested_code, w.nested_absmax, w.offset)
    return (w.packed, w.absmax, w.code, w.absmax, w.absmax, w.absmax)


def dequantize_triton(w: NF4Tensors, dtype: torch.dtype) -> Tensor:
    n, k = reference.check_weight(w)
    out = torch.empty((n, k), dtype=dtype, device=w.packed.device)
    n_bytes = n * k // 2
    block = 1024  # bytes per program: 2048 outputs, 8 per thread with 8 warps (16-byte bf16 stores)
    _nf4_dequant_kernel[(triton.cdiv(n_bytes, block),)](
        *_weight_args(w), out, n_bytes, w.blocksize, DOUBLE_QUANT=w.double_quant, BLOCK=block, num_warps=8
    )
    return out


@functools.cache  # device properties cost a driver call; decode calls this per token
def _num_programs_target(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: a few splits, so the split-K reduction is exercised by tests
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count  # 2 waves hide the tail


def small_m_config(n: int, k: int, blocksize: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, split_k) for the decode kernel."""
    block_n = 32  # narrow: at M <= 16 the weight stream is the whole cost, so more programs beat wider tiles
    block_k = min(64, blocksize)  # one absmax per row per tile; 64 bytes of K per row = 32 packed bytes
    k_tiles = k // block_k
    grid_n = triton.cdiv(n, block_n)
    split = max(1, min(k_tiles, triton.cdiv(_num_programs_target(device), grid_n)))
    return block_n, block_k, split


def _lora_args(lora: tuple[Tensor, Tensor, float] | None, x: Tensor) -> tuple[Tensor, Tensor, float, int]:
    """(t, B, scale, r) for the epilogue; without LoRA, x stands in for the pointers (never read)."""
    if lora is None:
        return x, x, 0.0, 0
    t, b, s = lora
    return t, b, float(s), t.shape[1]


def matmul_small_m(x2: Tensor, w: NF4Tensors, lora: tuple[Tensor, Tensor, float] | None = None) -> Tensor:
    m, k = x2.shape
    n = w.shape[0]
    assert m <= SMALL_M
    block_n, block_k, split = small_m_config(n, k, w.blocksize, x2.device)
    t, b, s, r = _lora_args(lora, x2)
    partial = torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    tiles_per_split = triton.cdiv(k // block_k, split)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // block_k, tiles_per_split))
    _nf4_matmul_small_m_kernel[grid](
        x2, *_weight_args(w), t, b, partial, s,
        m, n, k, w.blocksize, r, tiles_per_split,
        x2.stride(0), t.stride(0), b.stride(0), partial.stride(0), partial.stride(1),
        DOUBLE_QUANT=w.double_quant, HAS_LORA=lora is not None, R_BLOCK=R_BLOCK, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=3,
    )  # fmt: skip
    return partial[: grid[1]].sum(0).to(x2.dtype)


def matmul_fused(x2: Tensor, w: NF4Tensors, lora: tuple[Tensor, Tensor, float] | None = None) -> Tensor:
    m, k = x2.shape
    n = w.shape[0]
    t, b, s, r = _lora_args(lora, x2)
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _nf4_matmul_kernel[grid](
        x2, *_weight_args(w), t, b, out, s,
        m, n, k, w.blocksize, r, triton.next_power_of_2(m),
        x2.stride(0), t.stride(0), b.stride(0), out.stride(0),
        DOUBLE_QUANT=w.double_quant, HAS_LORA=lora is not None, R_BLOCK=R_BLOCK,
    )  # fmt: skip
    return out


def matmul_dequant(x2: Tensor, w: NF4Tensors, lora: tuple[Tensor, Tensor, float] | None = None) -> Tensor:
    """Large-M alternative: dequantize once to x's dtype, then cuBLAS (the LoRA term via addmm)."""
    out = x2 @ dequantize_triton(w, x2.dtype).t()
    if lora is not None:
        t, b, s = lora
        out.addmm_(t, b.t(), alpha=s)
    return out


LARGE_M_PATH = os.environ.get("PHI3FAST_NF4_LARGE_M", "measure")  # 'measure' | 'fused' | 'dequant'
_LARGE_M_CHOICE: dict[tuple, str] = {}


def large_m_path(key: tuple, fused, dequant) -> str:
    """'fused' or 'dequant' for a large-M GEMM; fused and dequant are zero-argument callables running each path.

    Measured once per key on CUDA (triton.testing.do_bench); the interpreter always takes the fused kernel,
    which is what it exists to test, unless LARGE_M_PATH forces a path."""
    if LARGE_M_PATH in ("fused", "dequant"):
        return LARGE_M_PATH
    if LARGE_M_PATH != "measure":
        raise ValueError(f"PHI3FAST_NF4_LARGE_M={LARGE_M_PATH!r}: expected measure, fused or dequant")
    if INTERPRET:
        return "fused"
    if key not in _LARGE_M_CHOICE:
        t_fused = triton.testing.do_bench(fused, warmup=5, rep=20)
        t_dequant = triton.testing.do_bench(dequant, warmup=5, rep=20)
        _LARGE_M_CHOICE[key] = "fused" if t_fused <= t_dequant else "dequant"
    return _LARGE_M_CHOICE[key]


def matmul_triton(x2: Tensor, w: NF4Tensors, lora: tuple[Tensor, Tensor, float] | None = None) -> Tensor:
    """[M, K] @ W^T (+ scale * t @ B^T) with the path chosen by M (see the module docstring)."""
    m, k = x2.shape
    if m == 0:
        return x2.new_empty((0, w.shape[0]))
    if m <= SMALL_M:
        return matmul_small_m(x2, w, lora)
    key = ("fwd", triton.next_power_of_2(m), w.shape[0], k, x2.dtype, w.double_quant, lora is not None)
    path = large_m_path(key, lambda: matmul_fused(x2, w, lora), lambda: matmul_dequant(x2, w, lora))
    return matmul_fused(x2, w, lora) if path == "fused" else matmul_dequant(x2, w, lora)


def as_rows(x: Tensor) -> Tensor:
    """x [..., K] as a [M, K] matrix with unit stride along K (what the kernels index)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---- public ops --------------------------------------------------------------------------------------------------


def nf4_dequantize(w: NF4Tensors, dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> Tensor:
    """W [N, K] in dtype."""
    reference.check_weight(w)
    if resolve_backend(backend, w.packed.device, dtype, gemm=False) == "torch":
        return reference.dequantize(w, dtype)
    return dequantize_triton(w, dtype)


def nf4_matmul(x: Tensor, w: NF4Tensors, backend: str = "auto") -> Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype, fp32 accumulation."""
    n, k = reference.check_weight(w)
    reference.check_input(x, k)
    if resolve_backend(backend, x.device, x.dtype) == "torch":
        # CPU: the native kernels (docs/cpu-inference.md); a differentiable frozen layer is lora.nf4_linear.
        if backend == "auto" and nf4_cpu.supports(x) and not (x.requires_grad and torch.is_grad_enabled()):
            return nf4_cpu.linear(x, w)
        return reference.nf4_matmul(x, w)
    return matmul_triton(as_rows(x), w).view(*x.shape[:-1], n)


# ---- AOT specs ---------------------------------------------------------------------------------------------------

AOT_DTYPES = {name: pointer_type(name) for name in GPU_DTYPES}  # the activations Triton GEMMs run with


def _weight_signature(double_quant: bool) -> dict[str, str]:
    return {
        "packed_ptr": "*u8",
        "absmax_ptr": "*u8" if double_quant else "*fp32",
        "code_ptr": "*fp32",
        "nested_code_ptr": "*fp32",
        "nested_absmax_ptr": "*fp32",
        "offset_ptr": "*fp32",
    }


def aot_specs() -> list[AotSpec]:
    """Every (dtype, double quant, LoRA epilogue, tile config) the launchers can run on a GPU."""
    specs = []
    for dq in (True, False):
        for dname, ptr in {
            **AOT_DTYPES,
            "fp32": pointer_type("fp32"),
        }.items():  # nf4_dequantize may also write fp32
            sig = {**_weight_signature(dq), "out_ptr": ptr, "n_bytes": "i32", "blocksize": "i32"}
            sig = {k: sig[k] for k in _nf4_dequant_kernel.arg_names if k in sig}
            specs.append(AotSpec(_nf4_dequant_kernel, "nf4_dequant", f"{dname},dq={int(dq)},BLOCK=1024", sig,
                                 {"DOUBLE_QUANT": dq, "BLOCK": 1024}, num_warps=8, num_stages=1))  # fmt: skip
            if dname == "fp32":
                continue
            for lora in (False, True):
                common = {
                    "x_ptr": ptr, **_weight_signature(dq), "t_ptr": ptr, "b_ptr": ptr, "lora_scale": "fp32",
                    "M": "i32", "N": "i32", "K": "i32", "blocksize": "i32", "R": "i32",
                    "stride_xm": "i32", "stride_tm": "i32", "stride_bn": "i32", "stride_om": "i32",
                }  # fmt: skip
                flags = {"DOUBLE_QUANT": dq, "HAS_LORA": lora, "R_BLOCK": R_BLOCK}
                label = f"{dname},dq={int(dq)},lora={int(lora)}"
                big = _nf4_matmul_kernel.fn
                for c in _matmul_configs():
                    sig = {**common, "out_ptr": ptr, "M_BUCKET": "i32"}
                    sig = {k: sig[k] for k in big.arg_names if k in sig}
                    cfg = ",".join(f"{k}={v}" for k, v in c.kwargs.items())
                    specs.append(AotSpec(big, "nf4_matmul", f"{label},{cfg},w={c.num_warps},s={c.num_stages}", sig,
                                         {**flags, **c.kwargs}, c.num_warps, c.num_stages))  # fmt: skip
                small = _nf4_matmul_small_m_kernel
                for block_k in (32, 64):  # small_m_config: min(64, blocksize), blocksize >= 32
                    sig = {**common, "out_ptr": "*fp32", "TILES_PER_SPLIT": "i32", "stride_os": "i32"}
                    sig = {k: sig[k] for k in small.arg_names if k in sig}
                    specs.append(AotSpec(small, "nf4_matmul_small_m", f"{label},BLOCK_N=32,BLOCK_K={block_k},w=4,s=3",
                                         sig, {**flags, "BLOCK_N": 32, "BLOCK_K": block_k}, 4, 3))  # fmt: skip
    return specs
