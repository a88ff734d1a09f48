"""PyTorch reference for the NF4 kernels: the CPU runtime path (fp32 and bf16) and the tests' building blocks.

Everything here is plain torch, so it runs on any device. The Triton launchers in nf4.py and lora.py share the
argument checks below, so every backend rejects bad input with the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from .backend import KernelInputError, one_cpu_thread


class NF4Tensors(Protocol):
    """What the NF4 ops read from a weight (phi3fast.quant.NF4Weight is one): W[N, K] in bitsandbytes' layout,
    `packed` uint8 [N*K/2, 1] (element 2i in the high nibble), `code` the fp32 codebook [16], one scale per
    `blocksize` consecutive elements, decoded by real_absmax() (fp32 [nblocks]). The kernels also read the
    double-quantization tensors (absmax codes, nested_code, nested_absmax, offset) directly."""

    packed: Tensor
    absmax: Tensor
    code: Tensor
    nested_absmax: Tensor | None
    nested_code: Tensor | None
    offset: Tensor | None
    blocksize: int
    shape: tuple[int, int]
    double_quant: bool

    def real_absmax(self) -> Tensor: ...


def check_weight(w: NF4Tensors) -> tuple[int, int]:
    """(N, K) of an NF4 weight whose K and N are multiples of its blocksize (every kernel tile relies on it)."""
    n, k = w.shape
    bs = w.blocksize
    if bs < 32 or bs & (bs - 1):
        raise KernelInputError(
            f"NF4 blocksize {bs}: expected a power of two >= 32 (the kernels' K-tile is 32 or 64)"
        )
    if k % bs or n % bs:
        raise KernelInputError(
            f"NF4 weight of shape ({n}, {k}): K={k} and N={n} must both be multiples of the blocksize {bs} "
            "(each K-tile of a row must cover whole absmax blocks)"
        )
    if w.packed.numel() * 2 != n * k:
        raise KernelInputError(
            f"NF4 weight of shape ({n}, {k}) holds {w.packed.numel()} packed bytes, expected {n * k // 2}"
        )
    return n, k


def check_input(x: Tensor, k: int, name: str = "x") -> None:
    if not x.is_floating_point():
        raise KernelInputError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise KernelInputError(f"{name} of shape {tuple(x.shape)}: the last dimension must be K={k}")


def check_lora(x: Tensor, n: int, k: int, lora_a: Tensor, lora_b: Tensor, x_lora: Tensor | None) -> None:
    check_input(x, k)
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise KernelInputError(f"lora_a of shape {tuple(lora_a.shape)}: expected (r, K={k})")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (n, r):
        raise KernelInputError(f"lora_b of shape {tuple(lora_b.shape)}: expected (N={n}, r={r})")
    if x_lora is not None and x_lora.shape != x.shape:
        raise KernelInputError(f"x_lora of shape {tuple(x_lora.shape)} must match x's shape {tuple(x.shape)}")


# ---- NF4 math ---------------------------------------------------------------------------------------------------
# Note: Decode in Chunks. W is decoded in chunks and each chunk is used right away, so a matmul never holds a full
# dequantized copy of W, and each weight is decoded exactly once per op, into buffers allocated once per call:
#   1. packed bytes -> int32 indices, copied into a reused buffer (index_select takes int32 as fast as int64),
#   2. one 1-D index_select from a 256-entry table whose int64 entries hold the byte's two fp32 code values (high
#      nibble first): one 8-byte load per byte,
#   3. code * absmax in fp32 over a [blocks, blocksize] view (in place), rounded once to the compute dtype by
#      the copy into the tile: bit-identical to bitsandbytes.
# Note: Threads. The decode runs on one intra-op thread (and so does the whole op when M <= SMALL_M, where the
# GEMMs are tiny): see backend.one_cpu_thread. Large-M GEMMs keep all threads.
# Chunk sizes: small M is decode-bound and takes SMALL_M_CHUNK weights per chunk; with many rows the GEMM
# dominates and wide chunks (CHUNK_ELEMENTS) keep oneDNN's tiles efficient. Measurements: docs/nf4-format.md.

CHUNK_ELEMENTS = 1 << 22  # 4M weights: 8 MB bf16 tile + 16 MB fp32 codes + 8 MB indices of workspace
SMALL_M = 16
SMALL_M_CHUNK = 1 << 20


class Decoder:
    """Per-call decoding state of one NF4 weight: the byte table, fp32 absmax and reusable chunk buffers."""

    def __init__(self, w: NF4Tensors, dtype: torch.dtype, chunk: int) -> None:
        n, k = check_weight(w)
        code = w.code.float()
        pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1).contiguous()
        self.table = pairs.view(torch.int64).view(256)
        self.absmax = w.real_absmax().float().view(n, k // w.blocksize)
        self.packed = w.packed.view(n, k // 2)
        self.bs, self.dtype = w.blocksize, dtype
        dev = w.packed.device
        self.idx = torch.empty(chunk // 2, dtype=torch.int32, device=dev)
        self.vals = torch.empty(chunk // 2, dtype=torch.int64, device=dev)
        self.tile = torch.empty(chunk, dtype=dtype, device=dev)


def dequantize_tile(
    w: NF4Tensors, dec: Decoder, rows: slice, cols: slice, out: Tensor | None = None
) -> Tensor:
    """W[rows, cols] in dec.dtype (written to `out` if given, else to dec's tile buffer, valid until the next
    call); cols start and stop on blocksize boundaries."""
    bs = dec.bs
    p = dec.packed[rows, cols.start // 2 : cols.stop // 2]
    r, nb = p.shape
    idx = dec.idx[: r * nb].view(r, nb)
    idx.copy_(p)
    vals = torch.index_select(dec.table, 0, idx.view(-1), out=dec.vals[: r * nb]).view(torch.float32)
    if out is None:
        out = dec.tile[: r * nb * 2].view(r, nb * 2)
    scale = dec.absmax[rows, cols.start // bs : cols.stop // bs, None]
    if out.dtype == torch.float32:
        torch.mul(vals.view(r, -1, bs), scale, out=out.view(r, -1, bs))
    else:
        # In place in fp32, then one rounding on the copy: faster than a mixed-dtype mul with a bf16 out= (the
        # same bits: both round the fp32 product once).
        out.copy_(vals.view(r, -1, bs).mul_(scale).view(r, -1))
    return out


def _chunk(m: int) -> int:
    return min(CHUNK_ELEMENTS, SMALL_M_CHUNK) if m <= SMALL_M else CHUNK_ELEMENTS


def _row_chunks(n: int, k: int, chunk: int) -> list[slice]:
    step = max(1, chunk // k)
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _col_chunks(n: int, k: int, bs: int, chunk: int) -> list[slice]:
    step = max(bs, chunk // n // bs * bs)
    return [slice(s, min(s + step, k)) for s in range(0, k, step)]


def _workspace(w: NF4Tensors, dtype: torch.dtype, chunks: list[slice], width: int) -> Decoder:
    """A decoder whose buffers hold the largest of `chunks` (slices of length <= chunks[0]) times `width`."""
    return Decoder(w, dtype, (chunks[0].stop - chunks[0].start) * width)


def dequantize(w: NF4Tensors, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [N, K] in dtype."""
    n, k = check_weight(w)
    chunks = _row_chunks(n, k, min(CHUNK_ELEMENTS, SMALL_M_CHUNK))
    dec = _workspace(w, dtype, chunks, k)
    out = torch.empty((n, k), dtype=dtype, device=w.packed.device)
    with one_cpu_thread(out.device):
        for rows in chunks:
            dequantize_tile(w, dec, rows, slice(0, k), out[rows])
    return out


def _tiled_gemm(
    a: Tensor,
    w: NF4Tensors,
    dec: Decoder,
    chunks: list[slice],
    decode: Callable[[slice], Tensor],
    out: Tensor,
) -> Tensor:
    """out[:, c] = a @ decode(c) for every chunk c of W, where decode(c) dequantizes W's part c into dec's tile.

    Small M (decode-bound): everything on one intra-op thread. Large M (GEMM-bound): the decode on one thread,
    the matmuls on all (see backend.one_cpu_thread)."""
    small = a.shape[0] <= SMALL_M
    with one_cpu_thread(a.device, small):
        for c in chunks:
            with one_cpu_thread(a.device, not small):
                right = decode(c)
            if len(chunks) == 1:
                torch.mm(a, right, out=out)
            else:
                out[:, c] = a @ right
    return out


def matmul_rows(x2: Tensor, w: NF4Tensors) -> Tensor:
    """x2 [M, K] @ W^T, one chunk of output columns (rows of W) at a time."""
    n, k = w.shape
    chunks = _row_chunks(n, k, _chunk(x2.shape[0]))
    dec = _workspace(w, x2.dtype, chunks, k)
    out = x2.new_empty((x2.shape[0], n))
    return _tiled_gemm(x2, w, dec, chunks, lambda rows: dequantize_tile(w, dec, rows, slice(0, k)).t(), out)


def nf4_matmul(x: Tensor, w: NF4Tensors) -> Tensor:
    """x @ W^T in x's dtype (CPU bf16 matmuls accumulate in fp32 inside oneDNN)."""
    n, k = check_weight(w)
    check_input(x, k)
    return matmul_rows(x.reshape(-1, k), w).view(*x.shape[:-1], n)


def base_plus_lora(x2: Tensor, w: NF4Tensors, t: Tensor, b: Tensor, scale: float) -> Tensor:
    """x2 W^T + scale * t B^T for x2 [M, K], t = x_lora A^T [M, r] (the LoRA forward's two GEMMs)."""
    return matmul_rows(x2, w).addmm_(t, b.t(), alpha=scale)


def lora_dx(g2: Tensor, w: NF4Tensors, lora: tuple[Tensor, Tensor, float] | None) -> Tensor:
    """dY W (+ scale * u A with u = dY B, when x_lora is x): the LoRA backward's input gradient, one chunk of
    output columns (columns of W) at a time, so every sum over N happens inside one matmul."""
    n, k = w.shape
    chunks = _col_chunks(n, k, w.blocksize, _chunk(g2.shape[0]))
    dec = _workspace(w, g2.dtype, chunks, n)
    dx = g2.new_empty((g2.shape[0], k))
    _tiled_gemm(g2, w, dec, chunks, lambda cols: dequantize_tile(w, dec, slice(0, n), cols), dx)
    if lora is not None:
        u, a, scale = lora
        dx.addmm_(u, a, alpha=scale)
    return dx
