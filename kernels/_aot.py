"""Ahead-of-time compile specs: what `python -m phi3fast.kernels.report` compiles for sm_80 and sm_90.

Every kernel module exposes `aot_specs() -> list[AotSpec]`, one spec per launch configuration it can use, so the
report compiles exactly the configurations the launchers (and autotune) may pick at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AotSpec:
    # A triton JITFunction; under @triton.autotune, the Autotuner's `.fn` (the undecorated kernel).
    kernel: Any
    name: str  # row label in the report, e.g. "nf4_matmul"
    config: str  # human-readable launch config, e.g. "BM=64,BN=128,BK=64,w=4,s=3"
    # Argument name -> triton type ('*fp16', 'i32', ...); constexpr arguments go in constexprs.
    signature: dict[str, str] = field(default_factory=dict)
    constexprs: dict[str, object] = field(default_factory=dict)  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    # Arguments the JIT sees as multiples of 16 at run time (torch's allocations are 16-byte aligned; sizes and
    # strides that are multiples of 16 at the target shapes): compiled with tt.divisibility=16 as the JIT would
    # specialize them, so the report shows the vectorized loads the kernel really runs. Empty = no assumption.
    aligned: tuple[str, ...] = ()
