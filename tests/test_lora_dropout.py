"""LoRA dropout on CPU through the native kernel (kernels.lora.lora_dropout, csrc/nf4/dropout.h): the mask's
rate, the scaling, the backward, determinism under torch's RNG, and independence from the thread count."""

from __future__ import annotations

import math

import pytest
import torch
from phi3fast.kernels import nf4_cpu
from phi3fast.kernels.backend import KernelInputError
from phi3fast.kernels.lora import lora_dropout

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="native module not built")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("p", (0.05, 0.5))
def test_rate_scale_and_backward(dtype: torch.dtype, p: float) -> None:
    x = (torch.randn(301, 517) + 3.0).to(dtype).requires_grad_(True)  # + 3: no input element is 0
    y = lora_dropout(x, p)
    assert y.dtype == dtype and y.shape == x.shape
    keep = y != 0
    n = x.numel()
    dropped = n - int(keep.sum())
    assert abs(dropped - p * n) <= 5 * math.sqrt(n * p * (1 - p))  # binomial, 5 sigma
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert torch.equal(y[keep], (x.detach().float()[keep] * scale).to(dtype))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(keep, (g.float() * scale).to(dtype), torch.zeros_like(g)))


def test_pairs_are_independent() -> None:
    """Neighbouring elements are dropped together at rate p^2, not p (a broken hash would correlate them)."""
    p = 0.5
    y = lora_dropout(torch.ones(1 << 20), p)
    d = y == 0
    both = (d[:-1] & d[1:]).float().mean().item()
    assert abs(both - p * p) < 0.01


def test_follows_torch_rng_and_not_the_thread_count() -> None:
    x = torch.randn(64, 3000)  # several pool tasks
    torch.manual_seed(7)
    with nf4_cpu.pinned_threads(1):
        a = lora_dropout(x, 0.1)
    torch.manual_seed(7)
    with nf4_cpu.pinned_threads(2):
        b = lora_dropout(x, 0.1)
    assert torch.equal(a, b)
    assert not torch.equal(lora_dropout(x, 0.1), lora_dropout(x, 0.1))  # a new seed per call


def test_p_zero_and_bad_p() -> None:
    x = torch.randn(4, 5)
    assert lora_dropout(x, 0.0) is x
    for p in (1.0, -0.1):
        with pytest.raises(KernelInputError, match="dropout p"):
            lora_dropout(x, p)


def test_phi3_linear_uses_it_in_training_only(monkeypatch) -> None:
    from phi3fast.kernels import lora as klora

    from phi3fast.model.phi3 import Phi3Linear

    calls = []
    real = klora._NativeDropout.apply
    monkeypatch.setattr(klora._NativeDropout, "apply", lambda *a: calls.append(1) or real(*a))
    lin = Phi3Linear(64, 32)
    lin.set_base(torch.randn(32, 64))
    lin.add_lora(4, 2.0, 0.1)
    x = torch.randn(3, 64)
    lin.train()
    lin(x)
    assert calls == [1]
    lin.eval()
    lin(x)
    assert calls == [1]
