"""QLoRA through the native NF4 CPU kernels (backend 'auto' on CPU: forward with the LoRA term fused, dX through
every projection) against the torch reference path of the same ops, on a tiny model with more than 16 rows per
GEMM (the panel GEMM, not decode's GEMV).

Tolerances: fp32 compute, gradients within test_kernels_nf4's fp32 table and 6 training steps' losses within
1e-5 relative (fp32 summation order only). bf16 compute (nf4_cpu.compute_mode('bf16'), AVX512-BF16): each GEMM
is within 2^-8 sum |a w| (test_nf4_cpu_bf16.py); through the 2-layer model the LoRA gradients stay within 2e-2
relative (Frobenius) of the fp32 path's and the loss within 1e-4 (measured here: <= 8.5e-3 and <= 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import VOCAB, make_tiny, rel_err
from phi3fast.kernels import lora as klora
from phi3fast.kernels import nf4_cpu
from test_kernels_nf4 import assert_close

from phi3fast.lora import LoraConfig, apply_lora, lora_parameters
from phi3fast.model import load
from phi3fast.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="native NF4 kernels not built")
DATA = Path(__file__).parent / "data" / "train_memorize.jsonl"
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory)


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Counts of the native kernels' calls (to prove which path ran)."""
    seen = {"linear": 0, "dx": 0}
    for name in seen:
        real = getattr(nf4_cpu, name)

        def spy(*args, _real=real, _name=name, **kw):
            seen[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(nf4_cpu, name, spy)
    monkeypatch.setattr(
        klora, "dx_kernel", lambda backend: {"native": nf4_cpu.dx}.get(backend) or _dx(backend)
    )
    return seen


_dx = klora.dx_kernel


def _model(tiny: Path, targets=TARGETS):
    model = load(tiny)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _grads(model, ids: torch.Tensor, backend: str) -> tuple[float, list[torch.Tensor]]:
    for lin in model.linears().values():
        lin.kernel_backend = backend
    model.zero_grad(set_to_none=True)
    model.train()
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("targets", [TARGETS, ("qkv_proj",)], ids=["all", "qkv_only"])
def test_native_gradients_match_the_torch_path(tiny: Path, calls, targets) -> None:
    model = _model(tiny, targets)
    ids = torch.randint(0, VOCAB, (2, 23))  # 46 rows per GEMM
    loss, grads = _grads(model, ids, "auto")
    assert calls["linear"] > 0 and calls["dx"] > 0
    ref_loss, ref = _grads(model, ids, "torch")
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for got, want in zip(grads, ref, strict=True):
        assert got.abs().sum() > 0
        assert_close(got, want, torch.float32)


@pytest.mark.skipif(not nf4_cpu.bf16_compute_supported(), reason="CPU without AVX512-BF16")
def test_bf16_compute_gradients_within_tolerance(tiny: Path) -> None:
    model = _model(tiny)
    ids = torch.randint(0, VOCAB, (2, 23))
    loss, grads = _grads(model, ids, "auto")
    with nf4_cpu.compute_mode("bf16"):
        loss16, grads16 = _grads(model, ids, "auto")
    assert abs(loss16 - loss) <= 1e-4 * abs(loss)
    assert loss16 != loss  # the bf16 GEMMs did run
    for got, want in zip(grads16, grads, strict=True):
        assert rel_err(got, want) < 2e-2


def _run(tiny: Path, out: Path) -> list[float]:
    cfg = TrainConfig(model=str(tiny), data=str(DATA), out=str(out), max_steps=6, batch_size=2, seq_len=16,
                      lr=1e-2, warmup=2, rank=4, alpha=8, dropout=0.05, save_every=0, dtype="fp32",
                      progress=False, quantize="nf4", kernels="torch")  # fmt: skip
    return train(cfg).losses


def test_training_steps_match_the_torch_path(tiny: Path, tmp_path: Path, calls, monkeypatch) -> None:
    """6 QLoRA steps (dropout on, the same seed) through the native kernels and through the torch reference."""
    native = _run(tiny, tmp_path / "native")
    assert calls["linear"] > 0 and calls["dx"] > 0
    monkeypatch.setattr(klora, "_resolve_nf4", lambda backend, x: "torch")
    before = dict(calls)
    ref = _run(tiny, tmp_path / "torch")
    assert calls == before  # the reference run never touched the native kernels
    assert len(native) == len(ref) == 6
    for a, b in zip(native, ref, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
