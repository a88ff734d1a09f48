"""NF4 quantization in Triton: per-block absmax, 4-bit codes and nibble packing, bit-identical to bitsandbytes.

Used by `phi3fast.quant.quantize_nf4` for CUDA tensors; `quantize_blocks_torch` below is the torch reference and the
CPU path (quantizing a 3.8B model at load time). Two passes over W:
`_block_absmax_kernel` writes the per-block absmax, torch takes the reciprocals (one IEEE division per block), and
`_nf4_quantize_kernel` writes the packed codes: W is read twice (bf16: 4 bytes read + 0.5 written per element;
at HBM bandwidth that is milliseconds per GB of weights, an estimate: no GPU was available to measure it, against
seconds to read a checkpoint from disk). The final partial block
(< blocksize elements, when numel % blocksize != 0) stays in torch (`quantize_blocks_torch`), so both paths share
that code; the double quantization of the absmax (1/64 of the data) is the format's, in phi3fast.quant.

Exactness (what makes the codes equal bitsandbytes' and the torch path's):
- the reciprocal of each absmax is rounded once (torch's IEEE division; Triton's default fp32 `/` on CUDA is an
  approximate division) and then multiplied, as bitsandbytes does (its partial block divides instead: torch path);
- the code is the number of fp32 codebook midpoints strictly below the scaled value (a tie rounds down), counted
  against the very midpoint tensor the torch path uses (`bounds_ptr`), not against re-typed literals.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._aot import AotSpec
from .backend import DTYPES, KernelInputError, pointer_type

# bitsandbytes' NF4 codebook (QLoRA, Dettmers et al. 2023): the 16 quantiles of N(0, 1), normalized to [-1, 1].
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# fp32 midpoints between neighbouring codes; equal to the pivots of bitsandbytes' CUDA decision tree.
NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these
# Elements per CPU chunk: a multiple of every blocksize; ~14 bytes of temporaries per element -> ~3.5 MB.
CPU_CHUNK = 1 << 18
# At least 1024 elements per program and 8 per thread (4 warps): one 16-byte vector load per thread for bf16.
# 32 per thread needed 160-180 registers and spilled on sm_90. A block larger than 1024 elements must stay in one
# program (one absmax), so it gets more warps instead.
MIN_ELEMENTS_PER_PROGRAM = 1024
ELEMENTS_PER_THREAD = 8
NUM_STAGES = 1  # no loop to pipeline


@triton.jit
def _block_absmax_kernel(
    x_ptr,  # W flattened, fp32/fp16/bf16, at least n_blocks * BLOCKSIZE elements
    absmax_ptr,  # fp32 [n_blocks]
    n_blocks,  # full blocks only
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    blk = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    in_range = blk < n_blocks
    offs = blk[:, None].to(tl.int64) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + offs, mask=in_range[:, None], other=0.0).to(tl.float32)
    tl.store(absmax_ptr + blk, tl.max(tl.abs(x), axis=1), mask=in_range)


@triton.jit
def _nf4_quantize_kernel(
    x_ptr,  # W flattened, fp32/fp16/bf16, at least n_blocks * BLOCKSIZE elements
    recip_ptr,  # fp32 [n_blocks], 1 / max(absmax, 1e-38) rounded once (torch, IEEE)
    packed_ptr,  # uint8 [n_blocks * BLOCKSIZE / 2]
    bounds_ptr,  # fp32 [15], NF4 codebook midpoints, ascending
    n_blocks,  # full blocks only
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    blk = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    in_range = blk < n_blocks
    offs = blk[:, None].to(tl.int64) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    recip = tl.load(recip_ptr + blk, mask=in_range, other=0.0)
    x = tl.load(x_ptr + offs, mask=in_range[:, None], other=0.0).to(tl.float32)
    scaled = tl.minimum(tl.maximum(x * recip[:, None], -1.0), 1.0)
    code = tl.zeros(scaled.shape, tl.int32)
    for i in tl.static_range(15):
        code += (scaled > tl.load(bounds_ptr + i)).to(tl.int32)
    # Element 2i -> high nibble, 2i + 1 -> low nibble. (Loading even and odd elements as two strided tiles
    # instead left a 16-byte local stack frame on sm_90, which the AOT report counts as a spill.)
    hi, lo = tl.split(tl.reshape(code, [BLOCKS_PER_PROGRAM, BLOCKSIZE // 2, 2]))
    byte_offs = blk[:, None].to(tl.int64) * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + byte_offs, ((hi << 4) | lo).to(tl.uint8), mask=in_range[:, None])


def nf4_quantize_blocks(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Packed codes uint8 [ceil(n/2), 1] and fp32 absmax [nblocks] of W (any shape, fp32/fp16/bf16)."""
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise KernelInputError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelInputError(f"w must be float32, float16 or bfloat16, got {w.dtype}")
    flat = w.reshape(-1).contiguous()
    n = flat.numel()
    n_full = n // blocksize
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(triton.cdiv(n, blocksize), dtype=torch.float32, device=w.device)
    if n_full:
        bpp, num_warps = launch_config(blocksize)
        grid = (triton.cdiv(n_full, bpp),)
        meta = dict(BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=bpp, num_warps=num_warps, num_stages=NUM_STAGES)
        _block_absmax_kernel[grid](flat, absmax, n_full, **meta)
        # The reciprocal is rounded once, by IEEE division, exactly as in the torch path and bitsandbytes (in a
        # kernel, div_rn's slow-path subroutine call costs a 16-byte stack frame on sm_90, counted as a spill).
        recip = 1.0 / absmax[:n_full].clamp(min=1e-38)
        _nf4_quantize_kernel[grid](flat, recip, packed, NF4_BOUNDS.to(w.device), n_full, **meta)
    if n_full * blocksize < n:  # the partial last block: divides, may pad a nibble (torch path, shared)
        tail_packed, tail_absmax = quantize_blocks_torch(flat[n_full * blocksize :], blocksize)
        packed[n_full * blocksize // 2 :] = tail_packed
        absmax[n_full:] = tail_absmax
    return packed, absmax


def launch_config(blocksize: int) -> tuple[int, int]:
    """(blocks per program, warps) for a blocksize: whole blocks, >= 1024 elements, 8 elements per thread."""
    elements = max(MIN_ELEMENTS_PER_PROGRAM, blocksize)
    return elements // blocksize, elements // (32 * ELEMENTS_PER_THREAD)


# ---- torch reference (the CPU path) -----------------------------------------------------------------------------


def quantize_blocks_torch(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes uint8 [ceil(n/2), 1] and fp32 absmax [nblocks] of W (any shape), bitsandbytes' rounding.

    Works through W in chunks of whole blocks (CPU_CHUNK elements: the temporaries stay in L2, and peak memory
    stays a few MB above the output whatever the size of W).
    """
    flat = w.reshape(-1)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    out = packed.view(-1)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=w.device)
    full_n = n - n % blocksize
    chunk = max(CPU_CHUNK // blocksize, 1) * blocksize  # whole blocks, an even count
    for start in range(0, full_n, chunk):
        blocks = flat[start : min(start + chunk, full_n)].float().view(-1, blocksize)
        am = blocks.abs().amax(dim=1)  # not torch.aminmax: slower on CPU (docs/nf4-format.md)
        absmax[start // blocksize : start // blocksize + am.numel()] = am
        # Multiply by the rounded reciprocal, as bitsandbytes does; clamp(min=1e-38) keeps all-zero blocks at 0.
        scaled = torch.mul(blocks, (1.0 / am.clamp_(min=1e-38))[:, None]).clamp_(-1, 1)
        out[start // 2 : start // 2 + scaled.numel() // 2] = _pack_pairs(_nf4_codes(scaled.view(-1)))
    if full_n < n:  # the final partial block: bitsandbytes divides here instead, and keeps the clamped absmax
        tail = flat[full_n:].float()
        am_tail = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am_tail
        scaled = (tail / am_tail).clamp_(-1, 1)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(
                scaled, (0, 1)
            )  # the pad nibble is the code of 0.0 (7), as in bnb
        out[full_n // 2 :] = _pack_pairs(_nf4_codes(scaled.view(-1)))
    return packed, absmax


def _nf4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """uint8 codes of values in [-1, 1]: how many codebook midpoints lie strictly below each (ties round down).

    Exact table lookup on the top 16 bits of the fp32 pattern (sign, exponent, 7 mantissa bits): all floats with
    the same top bits form one interval, which holds at most one midpoint, so code = base[key] + (x > mid[key]).
    Two gathers and a compare cost less than 15 compare-and-add passes or torch.bucketize (docs/nf4-format.md).
    """
    base, mid = _code_tables(scaled.device)
    key = scaled.view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF)
    codes = base.index_select(0, key.view(-1)).view(scaled.shape)
    codes += scaled > mid.index_select(0, key.view(-1)).view(scaled.shape)
    return codes


_CODE_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _code_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _CODE_TABLES:
        top = (
            torch.arange(65536, dtype=torch.int32) << 16
        )  # wraps to the sign bit for keys >= 2**15, as wanted
        ends = torch.stack((top.view(torch.float32), (top | 0xFFFF).view(torch.float32)))
        ends = ends.nan_to_num(0.0, 0.0, 0.0).clamp(-1, 1)  # inf/NaN patterns never occur in clamped values
        lo, hi = torch.bucketize(ends.amin(0), NF4_BOUNDS), torch.bucketize(ends.amax(0), NF4_BOUNDS)
        assert int((hi - lo).max()) <= 1, "a 16-bit bucket straddles two NF4 midpoints"
        mid = torch.where(hi > lo, NF4_BOUNDS[lo.clamp(max=14)], torch.tensor(2.0))  # 2.0: never exceeded
        _CODE_TABLES[device] = (lo.to(torch.uint8).to(device), mid.to(device))
    return _CODE_TABLES[device]


def _pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[2n] uint8 codes -> [n] bytes, code 2i in the high nibble and 2i + 1 in the low one."""
    if (
        sys.byteorder == "little"
    ):  # one int16 lane holds the pair (2i in its low byte): faster than strided writes
        pairs = codes.view(torch.int16)
        return ((pairs << 4) | (pairs >> 8)).to(torch.uint8)
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def aot_specs() -> list[AotSpec]:
    """Every (input dtype, blocksize) launch of the quantize kernel."""
    specs = []
    for dname in DTYPES:
        ptr = pointer_type(dname)
        for bs in SUPPORTED_BLOCKSIZES:
            bpp, warps = launch_config(bs)
            cfg = f"{dname},BLOCKSIZE={bs},BLOCKS_PER_PROGRAM={bpp},w={warps},s={NUM_STAGES}"
            constexprs = {"BLOCKSIZE": bs, "BLOCKS_PER_PROGRAM": bpp}
            sig = {"x_ptr": ptr, "absmax_ptr": "*fp32", "n_blocks": "i32"}
            specs.append(
                AotSpec(_block_absmax_kernel, "nf4_block_absmax", cfg, sig, constexprs, warps, NUM_STAGES)
            )
            sig = {
                "x_ptr": ptr,
                "recip_ptr": "*fp32",
                "packed_ptr": "*u8",
                "bounds_ptr": "*fp32",
                "n_blocks": "i32",
            }
            specs.append(
                AotSpec(_nf4_quantize_kernel, "nf4_quantize", cfg, sig, constexprs, warps, NUM_STAGES)
            )
    return specs
