"""quantize_nf4: a dense weight to an NF4Weight, on the Triton kernel (CUDA) or the torch reference (CPU)."""

from __future__ import annotations

import torch

from phi3fast.kernels.backend import interpreter_on, one_cpu_thread
from phi3fast.kernels.nf4_quantize import (
    NF4_CODE,
    SUPPORTED_BLOCKSIZES,
    nf4_quantize_blocks,
    quantize_blocks_torch,
)
from phi3fast.quant.format import (
    DYNAMIC_MAP,
    NESTED_BLOCKSIZE,
    SUPPORTED_DTYPES,
    NF4FormatError,
    NF4Weight,
    quantize_8bit,
)


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *, backend: str = "auto"
) -> NF4Weight:
    """Quantize W[N, K] (fp32/fp16/bf16) to NF4 exactly as bitsandbytes.functional.quantize_4bit(quant_type='nf4',
    compress_statistics=double_quant) does. backend: 'auto' = Triton on CUDA, torch on CPU; 'torch'; 'triton'
    (on CPU only under TRITON_INTERPRET=1)."""
    if not isinstance(w, torch.Tensor):
        raise NF4FormatError(f"quantize_nf4: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise NF4FormatError(f"quantize_nf4: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise NF4FormatError(f"quantize_nf4: w is empty, shape {tuple(w.shape)}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise NF4FormatError(f"quantize_nf4: w must be float32, float16 or bfloat16, got {w.dtype}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise NF4FormatError(
            f"quantize_nf4: blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}"
        )
    if backend not in ("auto", "torch", "triton"):
        raise NF4FormatError(f"quantize_nf4: backend must be 'auto', 'torch' or 'triton', got {backend!r}")

    if backend == "triton" and not w.is_cuda and not interpreter_on():
        raise NF4FormatError(
            "quantize_nf4: backend='triton' on CPU needs TRITON_INTERPRET=1 before triton loads"
        )
    w = w.detach()
    if backend == "triton" or (backend == "auto" and w.is_cuda):
        packed, absmax = nf4_quantize_blocks(w, blocksize)
    else:
        with one_cpu_thread(w.device):
            packed, absmax = quantize_blocks_torch(w, blocksize)
    # A NaN or inf makes its whole block NaN (bitsandbytes quantizes it silently); say where instead.
    bad = torch.nonzero(~torch.isfinite(absmax)) if not bool(torch.isfinite(absmax.sum())) else absmax[:0]
    if bad.numel():
        block = w.reshape(-1)[int(bad[0, 0]) * blocksize :][:blocksize]
        first = int(bad[0, 0]) * blocksize + int(torch.nonzero(~torch.isfinite(block))[0, 0])
        row, col = divmod(first, w.shape[1])
        value = w.reshape(-1)[first].item()
        raise NF4FormatError(f"quantize_nf4: w[{row}, {col}] is {value}; NaN and inf cannot be quantized")

    code = NF4_CODE.to(w.device)
    shape = (w.shape[0], w.shape[1])
    if not double_quant:
        return NF4Weight(packed, absmax, code, None, None, None, blocksize, shape, w.dtype, False)
    # The same fp32 torch reduction bitsandbytes uses, under the caller's thread setting (a parallel reduction
    # may round differently with another thread count), so the same bits as bitsandbytes in this process.
    offset = absmax.mean()
    with one_cpu_thread(w.device):  # elementwise ops and per-block maxima: the same bits on any thread count
        qabsmax, nested_absmax = quantize_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return NF4Weight(
        packed,
        qabsmax,
        code,
        nested_absmax,
        DYNAMIC_MAP.to(w.device),
        offset,
        blocksize,
        shape,
        w.dtype,
        True,
    )
