"""The native NF4 CPU kernels (csrc/nf4 via phi3fast.kernels.nf4_cpu) against fp32 torch oracles.

Every SIMD level this CPU supports is run (simd=...), plus one subprocess under the PHI3FAST_SIMD cap. The oracle
is computed in float64 from what the kernel sees: x as given (bf16 widened exactly) and W dequantized in fp32
(code * scale, the reference's values), so the only differences are fp32 summation order and the output rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from phi3fast.kernels import nf4_cpu
from phi3fast.kernels.backend import KernelInputError
from test_kernels_nf4 import assert_close

from phi3fast import _hnsw
from phi3fast.quant import quantize_nf4

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="native module built without the NF4 kernels")

LEVELS = list(_hnsw.supported_simd_levels())
DTYPES = (torch.float32, torch.bfloat16)
# (N, K, blocksize): K = 160 and 96 are not multiples of the AVX-512 step (32 weights) x 2, N = 96 / 160 leave a
# partial 32-wide panel... within what the format allows (N and K multiples of the blocksize). K = 320 and 384
# exercise the AVX-512 strided GEMV (csrc/nf4/gemv.h): 128-element groups, a 64 tail, blocks of 64 and 128.
WEIGHTS = [(96, 160, 32), (160, 96, 32), (192, 320, 64), (64, 128, 64), (128, 384, 128)]
MS = (1, 3, 17, 130)


def make_weight(n: int, k: int, bs: int, double_quant: bool = True):
    return quantize_nf4(torch.randn(n, k), blocksize=bs, double_quant=double_quant)


def oracle(a: torch.Tensor, right: torch.Tensor, extra: tuple | None = None) -> torch.Tensor:
    out = a.double() @ right.double()
    if extra is not None:
        left, r2, scale = extra
        out += scale * (left.double() @ r2.double())
    return out


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,bs", WEIGHTS)
def test_linear_matches_reference(simd: str, dtype: torch.dtype, n: int, k: int, bs: int) -> None:
    w = make_weight(n, k, bs)
    wd = w.dequantize(torch.float32)
    for m in MS:
        x = torch.randn(m, k).to(dtype)
        y = nf4_cpu.linear(x, w, simd=simd)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_close(y, oracle(x, wd.t()), dtype)


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_lora_fused(simd: str, dtype: torch.dtype) -> None:
    n, k, r = 160, 96, 5
    w = make_weight(n, k, 32, double_quant=False)
    wd = w.dequantize(torch.float32)
    a, b = torch.randn(r, k), torch.randn(n, r)
    for m in MS:
        x = torch.randn(2, m, k).to(dtype)  # a leading batch dimension: [..., K]
        t = x.float() @ a.t()
        y = nf4_cpu.linear(x, w, (t, b, 0.37), simd=simd)
        assert y.shape == (2, m, n)
        expected = oracle(x.reshape(-1, k), wd.t(), (t.reshape(-1, r), b.t(), 0.37))
        assert_close(y.reshape(-1, n), expected, dtype)


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,bs", WEIGHTS[:3])
def test_dx_matches_reference(simd: str, dtype: torch.dtype, n: int, k: int, bs: int) -> None:
    w = make_weight(n, k, bs)
    wd = w.dequantize(torch.float32)
    r = 7
    a, b = torch.randn(r, k), torch.randn(n, r)
    for m in MS:
        g = torch.randn(m, n).to(dtype)
        assert_close(nf4_cpu.dx(g, w, simd=simd), oracle(g, wd), dtype)
        u = g.float() @ b
        assert_close(nf4_cpu.dx(g, w, (u, a, 2.0), simd=simd), oracle(g, wd, (u, a, 2.0)), dtype)


def test_matches_torch_reference_path() -> None:
    """The native path and the torch reference (`_tiled_gemm`) agree on the same weight."""
    from phi3fast.kernels import nf4_reference as reference

    w = make_weight(192, 320, 64)
    for m in (1, 17):
        x = torch.randn(m, 320)
        assert_close(nf4_cpu.linear(x, w), reference.nf4_matmul(x, w), torch.float32)
        g = torch.randn(m, 192)
        assert_close(nf4_cpu.dx(g, w), reference.lora_dx(g, w, None), torch.float32)


def test_thread_count_does_not_change_results() -> None:
    """Each output element is summed by one task, so any thread count gives the same bits."""
    w = make_weight(192, 320, 64)
    for m in (1, 5, 40):
        x = torch.randn(m, 320)
        assert torch.equal(nf4_cpu.linear(x, w, threads=1), nf4_cpu.linear(x, w, threads=2))
        g = torch.randn(m, 192)
        assert torch.equal(nf4_cpu.dx(g, w, threads=1), nf4_cpu.dx(g, w, threads=3))


def test_empty_rows() -> None:
    w = make_weight(64, 128, 64)
    assert nf4_cpu.linear(torch.randn(0, 128), w).shape == (0, 64)
    assert nf4_cpu.dx(torch.randn(0, 64), w).shape == (0, 128)


def test_simd_cap_from_environment() -> None:
    """PHI3FAST_SIMD=scalar in a fresh process: the default path is then the scalar one, same results."""
    code = (
        "import torch; from phi3fast.kernels import nf4_cpu; from phi3fast.quant import quantize_nf4\n"
        "torch.manual_seed(0); w = quantize_nf4(torch.randn(96, 160), blocksize=32)\n"
        "x = torch.randn(3, 160)\n"
        "print(float((nf4_cpu.linear(x, w) - nf4_cpu.linear(x, w, simd='scalar')).abs().max()))\n"
        "try:\n    nf4_cpu.linear(x, w, simd='avx2')\nexcept ValueError as e:\n    print('refused', e)\n"
    )
    env = dict(os.environ, PHI3FAST_SIMD="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "0.0"  # capped default == forced scalar, bit for bit
    assert lines[1].startswith("refused") and "not supported" in lines[1]


def test_errors_are_clear() -> None:
    w = make_weight(64, 128, 64)
    with pytest.raises(KernelInputError, match="last dimension must be K=128"):
        nf4_cpu.linear(torch.randn(2, 127), w)
    with pytest.raises(KernelInputError, match="float32 or bfloat16"):
        nf4_cpu.linear(torch.randn(2, 128).half(), w)
    with pytest.raises(KernelInputError, match="floating-point"):
        nf4_cpu.linear(torch.ones(2, 128, dtype=torch.int32), w)
    with pytest.raises(KernelInputError, match="last dimension must be K=64"):
        nf4_cpu.dx(torch.randn(2, 128), w)
    with pytest.raises(KernelInputError, match="LoRA operands"):
        nf4_cpu.linear(torch.randn(2, 128), w, (torch.randn(2, 4), torch.randn(63, 4), 1.0))
    with pytest.raises(KernelInputError, match="LoRA operands"):
        nf4_cpu.dx(torch.randn(2, 64), w, (torch.randn(2, 4), torch.randn(4, 127), 1.0))
    with pytest.raises(ValueError, match="unknown SIMD level"):
        nf4_cpu.linear(torch.randn(2, 128), w, simd="avx9")


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_linear(simd: str, dtype: torch.dtype) -> None:
    """The dense small-M product (decode's lm_head): K = 100 leaves a tail past every SIMD width."""
    for n, k in [(333, 100), (64, 576)]:
        w = torch.randn(n, k).to(dtype)
        for m in (1, 3, 9, 17):
            x = torch.randn(m, k).to(dtype)
            assert_close(nf4_cpu.dense_linear(x, w, simd=simd), oracle(x, w.t()), dtype)
    with pytest.raises(KernelInputError, match="last dimension must be K=100"):
        nf4_cpu.dense_linear(torch.randn(2, 99), torch.randn(5, 100))
    with pytest.raises(KernelInputError, match="2-D float32/bfloat16"):
        nf4_cpu.dense_linear(torch.randn(2, 100), torch.randn(5, 100).half())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rowwise_ops_match_the_torch_references(dtype: torch.dtype) -> None:
    """The decode step's native RMSNorm, SwiGLU and RoPE against kernels/' torch references (odd sizes)."""
    from phi3fast.kernels.rmsnorm import rms_norm_reference
    from phi3fast.kernels.rope import rope_reference
    from phi3fast.kernels.swiglu import swiglu_reference

    x, w = torch.randn(2, 3, 97).to(dtype), (1 + torch.randn(97) / 4).to(dtype)
    assert nf4_cpu.rowwise_ok(x, w)
    assert_close(nf4_cpu.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), dtype)
    gu = torch.randn(5, 2 * 45).to(dtype)
    assert_close(nf4_cpu.swiglu(gu), swiglu_reference(gu), dtype)
    heads, kv, d = 3, 1, 10
    qkv = torch.randn(2, 7, (heads + 2 * kv) * d).to(dtype)
    ang = torch.randn(1, 7, d // 2)
    cos, sin = ang.cos().to(dtype).expand(2, 7, d // 2), ang.sin().to(dtype).expand(2, 7, d // 2)
    expected = rope_reference(qkv, cos, sin, heads, kv)
    out = nf4_cpu.rope_qkv_(qkv, cos, sin, heads + kv)
    assert out is qkv
    assert_close(qkv, expected, dtype)
    assert torch.equal(qkv[..., (heads + kv) * d :], expected[..., (heads + kv) * d :])  # v untouched


def test_rowwise_ok_refuses_what_it_cannot_run() -> None:
    x = torch.randn(2, 8)
    assert not nf4_cpu.rowwise_ok(x, x.bfloat16())  # mixed dtypes
    assert not nf4_cpu.rowwise_ok(x.half())
    assert not nf4_cpu.rowwise_ok(x.requires_grad_())  # a gradient is needed: the autograd path runs
    with torch.no_grad():
        assert nf4_cpu.rowwise_ok(x)


def test_auto_dispatch_runs_the_native_kernels(monkeypatch) -> None:
    """backend='auto' on CPU: nf4_matmul and lora_linear (forward and dX) call the native kernels, and their
    results and every gradient agree with backend='torch'."""
    from phi3fast.kernels import lora_linear, nf4_linear, nf4_matmul

    calls = {"linear": 0, "dx": 0}
    for name in calls:
        real = getattr(nf4_cpu, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(nf4_cpu, name, counted)
    w = make_weight(192, 320, 64)
    x = torch.randn(2, 9, 320, requires_grad=True)
    a = torch.randn(6, 320, requires_grad=True)
    b = torch.randn(192, 6, requires_grad=True)
    out = {}
    for backend in ("auto", "torch"):
        y = lora_linear(x, w, a, b, 0.5, backend=backend)
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(y, (x, a, b), g)
        out[backend] = (y, *grads)
    assert calls == {"linear": 1, "dx": 1}
    for got, want in zip(out["auto"], out["torch"], strict=True):
        assert_close(got, want, torch.float32)
    # A frozen NF4 layer (no LoRA) inside a graph: forward and dX = dY W natively, W gets no gradient.
    y = nf4_linear(x, w)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert calls == {"linear": 2, "dx": 2}
    assert_close(gx, torch.ones(2, 9, 192) @ w.dequantize(torch.float32), torch.float32)
    with torch.no_grad():
        assert torch.equal(nf4_matmul(x, w), y)


def test_outputs_take_in_place_ops_under_autograd() -> None:
    """RoPE rotates the qkv projection's output in place: the native paths' outputs must allow that."""
    from phi3fast.kernels import lora_linear
    from phi3fast.kernels.lora import nf4_linear

    w = make_weight(64, 128, 64)
    x = torch.randn(2, 3, 128, requires_grad=True)
    a, b = torch.randn(4, 128, requires_grad=True), torch.randn(64, 4, requires_grad=True)
    for y in (lora_linear(x, w, a, b, 0.5), nf4_linear(x, w)):
        y.mul_(2)
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert gx.shape == x.shape
