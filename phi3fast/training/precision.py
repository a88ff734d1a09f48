"""Numeric precision of a training run: the compute dtype, and dynamic loss scaling for fp16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from phi3fast.kernels.backend import DTYPES


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 makes bf16 matmuls faster than fp32 on CPU; without them bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


class LossScaler:
    """Dynamic loss scaling for fp16: scale up the loss so small gradients survive fp16, skip steps whose
    gradients overflowed and halve the scale, double it after `interval` clean steps."""

    def __init__(self, enabled: bool, scale: float = 2.0**16, interval: int = 1000) -> None:
        self.enabled, self.scale, self.interval, self.good = enabled, scale if enabled else 1.0, interval, 0

    def unscale_and_check(self, params: list[torch.nn.Parameter]) -> bool:
        """Divide grads by the scale; False (skip the step) if any is inf/nan."""
        if not self.enabled:
            return True
        finite = True
        for p in params:
            if p.grad is not None:
                p.grad.div_(self.scale)
                finite = finite and bool(torch.isfinite(p.grad).all())
        if finite:
            self.good += 1
            if self.good % self.interval == 0:
                self.scale *= 2.0
        else:
            self.scale, self.good = max(self.scale / 2.0, 1.0), 0
        return finite

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.scale, self.good = float(sd["scale"]), int(sd["good"])
