"""CPU threads of a training step: torch's small ops on one thread, the native NF4 kernels on every thread.

A QLoRA step on CPU issues thousands of small torch ops (norms, RoPE, SwiGLU, dropout, the LoRA matmuls, their
backward). With several intra-op threads each is an OpenMP region that waits for all its workers, and on a busy
machine for a descheduled one: in the profile of a step on the shared 2-core machine, an elementwise op on a
[4, 256, 576] tensor took ~10 ms instead of ~0.3 ms (docs/cpu-inference.md). The NF4 GEMMs (forward and dX) run on
the native pool, whose caller never waits for a worker that has not started, so they keep every core. The few
large GEMMs torch still runs (the chunked cross-entropy's lm_head) run under `all_threads`, with every thread
again: one region per large GEMM costs nothing next to its work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from phi3fast.kernels import nf4_cpu
from phi3fast.kernels.backend import one_cpu_thread


@contextmanager
def glue_threads(device: torch.device) -> Iterator[None]:
    """Inside: torch ops on one intra-op thread, the native NF4 kernels on the thread count torch had (CPU with
    the native module only; elsewhere a no-op). `all_threads` gives torch that count back for a block."""
    if device.type != "cpu" or not nf4_cpu.available():
        yield
        return
    with nf4_cpu.pinned_threads(torch.get_num_threads()), one_cpu_thread(device):
        yield


all_threads = nf4_cpu.full_threads
