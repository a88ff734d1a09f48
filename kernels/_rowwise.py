"""Shared by the row-wise kernels (rmsnorm.py, rope.py, swiglu.py): input errors, backend choice, launch sizes.

Launch sizes (the rule): a row-wise kernel holds one row (or one column block of it) in registers, BLOCK elements
wide (the next power of two), so the warp count grows with the block to keep about ELEMENTS_PER_THREAD fp32 values
of each live array per thread: enough for 16-byte vector loads, few enough that the backward's ~6 live arrays
fit in registers without spilling (the AOT report checks every block size the Phi-3 shapes use).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .backend import GPU_DTYPES, KernelInputError, pointer_type, resolve_backend

ELEMENTS_PER_THREAD = 16
MAX_WARPS = 16  # 512 threads: 128 registers per thread still fit an SM's 64K with one program resident
# The GPU activation dtypes the AOT report compiles (fp32 runs too): name -> pointer type.
AOT_DTYPES = {name: pointer_type(name) for name in GPU_DTYPES}


def resolve(backend: str, t: Tensor) -> str:
    """'triton' or 'torch' (row-wise ops have no GEMM: any float dtype runs on the Triton path on CUDA)."""
    return resolve_backend(backend, t.device, t.dtype, gemm=False)


def check_float(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise KernelInputError(f"{name} must be a floating-point tensor, got {got}")


def block_and_warps(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of `width` elements held in one program."""
    block = triton.next_power_of_2(max(width, 1))
    return block, min(max(block // (32 * ELEMENTS_PER_THREAD), 1), MAX_WARPS)


def unit_stride_rows(x: Tensor) -> Tensor:
    """x [..., H] as [M, H] with unit stride along H (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[0] == 0 else x2.contiguous()


def num_programs(device: torch.device) -> int:
    """Programs of a persistent (grid-stride) kernel: two per SM on CUDA; 3 in the interpreter, so tests with 7
    or 33 rows give each program several rows and an uneven last share."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def aligned_args(signature: dict[str, str], ints: tuple[str, ...]) -> tuple[str, ...]:
    """AotSpec.aligned: every pointer (torch allocations are 16-byte aligned) and the int arguments that are
    multiples of 16 at the shape a spec stands for."""
    return tuple(n for n, t in signature.items() if t.startswith("*") or n in ints)
