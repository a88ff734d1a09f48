"""NF4 quantization in Triton: per-block absmax, 4-bit codes and nibble packing, bit-identical to bitsandbytes.

Used by `phi3fast.quant.quantize_nf4` for CUDA tensors (quantizing a 3.8B model at load time). Two passes over W:
`_block_absmax_kernel` writes the per-block absmax, torch takes the reciprocals (one IEEE division per block), and
`_nf4_quantize_kernel` writes the packed codes: W is read twice (bf16: 4 bytes read + 0.5 written per element;
at HBM bandwidth that is milliseconds per GB of weights, an estimate: no GPU was available to measure it, against
seconds to read a checkpoint from disk). The double quantization of the
absmax (1/64 of the data) and the final partial block (< blocksize elements, when numel % blocksize != 0) stay
in torch, in `phi3fast.quant`, so both paths share that code.

Exactness (what makes the codes equal bitsandbytes' and the torch path's):
- the reciprocal of each absmax is rounded once (torch's IEEE division; Triton's default fp32 `/` on CUDA is an
  approximate division) and then multiplied, as bitsandbytes does (its partial block divides instead: torch path);
- the code is the number of fp32 codebook midpoints strictly below the scaled value (a tie rounds down), counted
  against the very midpoint tensor the torch path uses (`bounds_ptr`), not against re-typed literals.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from phi3fast.quant import NF4_BOUNDS, SUPPORTED_BLOCKSIZES, quantize_blocks_torch

from ._aot import AotSpec

_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
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
        raise ValueError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"w must be float32, float16 or bfloat16, got {w.dtype}")
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


def aot_specs() -> list[AotSpec]:
    """Every (input dtype, blocksize) launch of the quantize kernel."""
    specs = []
    for dname, ptr in _DTYPES.items():
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
