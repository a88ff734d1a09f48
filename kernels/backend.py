"""What every kernel shares: the backend choice, the dtypes, the input error, the interpreter flag, CPU threads.

This is the floor of phi3fast: it (and every op of kernels/) imports torch and triton only, never the layers
above (model, quant, training, rag, cli). The layers above call the ops with plain tensors, or with any object
that carries an NF4 weight's tensors (see nf4_reference.NF4Tensors).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated (at import): the launch configurations follow that value.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ("auto", "triton", "torch")
# The one dtype map: short name -> torch dtype (CLI choices, training, merge, the AOT report's pointer types).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The activation dtypes the Triton GEMMs and row-wise kernels are built for (and the AOT report compiles).
GPU_DTYPES = ("bf16", "fp16")


class KernelInputError(ValueError):
    """A bad argument to a kernel op (shape, dtype, backend): a ValueError whose message names the argument.
    The CLI prints it on one line, as it does phi3fast's own errors."""


def pointer_type(name: str) -> str:
    """Triton's signature type of a pointer to `name` elements ('bf16' -> '*bf16'), for the AOT specs."""
    return f"*{name}"


def interpreter_on() -> bool:
    """Whether TRITON_INTERPRET=1 is set now (what a CPU call on the Triton path requires)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, *, gemm: bool = True) -> str:
    """'torch' or 'triton' for an op on `device` with data of `dtype` (activations of a GEMM if `gemm`).

    'auto': Triton on CUDA (GEMMs: fp16/bf16 only), else the torch reference (fp32 GEMMs on CUDA included).
    'triton' off CUDA runs Triton's interpreter, which must be on and mis-rounds bf16 (no bf16 there)."""
    if backend not in BACKENDS:
        raise KernelInputError(f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
    gemm_ok = not gemm or dtype in (DTYPES[n] for n in GPU_DTYPES)
    if backend == "auto":
        return "triton" if device.type == "cuda" and gemm_ok else "torch"
    if backend == "torch":
        return backend
    if device.type == "cuda":
        if not gemm_ok:
            raise KernelInputError(f"backend='triton' on CUDA takes fp16 or bf16 activations, got {dtype}; use "
                                   "backend='auto' (runs the torch path) or cast the input")  # fmt: skip
        return backend
    if not interpreter_on():
        raise KernelInputError(
            f"backend='triton' on a {device.type} tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before phi3fast.kernels is imported, or use backend='auto'"
        )
    if dtype == torch.bfloat16:
        raise KernelInputError("backend='triton' on CPU runs Triton's interpreter, which cannot compute in bf16; "
                               "use fp32/fp16 or backend='torch'")  # fmt: skip
    return backend


@contextmanager
def one_cpu_thread(device: torch.device, on: bool = True) -> Iterator[None]:
    """Run a chunked CPU loop with one intra-op thread (a no-op off CPU or when `on` is False).

    Note: a chunked loop issues many small torch ops; with several intra-op threads each is an OpenMP parallel
    region, and on a busy machine every region waits for descheduled workers, which costs far more than the
    parallel speed-up of these memory-bound loops buys on an idle one (figures: docs/nf4-format.md).
    """
    threads = torch.get_num_threads()
    if not on or device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
