"""Shared test setup: a seed for every test, the `gpu` marker, and Triton's interpreter on CPU.

Running Triton kernels on a CPU-only machine
--------------------------------------------
Triton reads TRITON_INTERPRET when a kernel is decorated (at import of phi3fast.kernels), so this file sets
TRITON_INTERPRET=1 before any test module imports a kernel, unless CUDA is present or the variable is already
set. Kernel tests then call ops with backend='triton', which runs the real kernel code in the interpreter on
CPU tensors. By hand: `TRITON_INTERPRET=1 python -c "..."` with backend='triton'. The interpreter cannot do bf16
`tl.dot` or bf16 arithmetic correctly, so bf16 cases carry the `gpu` marker. Code that must compile kernels for
real (the AOT report) runs in a subprocess with TRITON_INTERPRET=0.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SEED = 1234


@pytest.fixture(autouse=True)
def seed_everything() -> int:
    """Every test starts from the same RNG state, so a failure reproduces exactly."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    return SEED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(
        reason="needs a CUDA GPU (bf16 Triton paths; the interpreter cannot run bf16 tl.dot on CPU)"
    )
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: that holds folder names too
            item.add_marker(skip_gpu)
