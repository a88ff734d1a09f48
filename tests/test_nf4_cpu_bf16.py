"""The NF4 CPU kernels' bf16 compute option (csrc/nf4/gemm_bf16.h; nf4_cpu.compute_mode / PHI3FAST_NF4_COMPUTE).

Stated tolerance: both operands of every product are rounded to bf16 (8 significant bits, round to nearest, so a
relative error <= 2^-9 each) and the products are summed in fp32, hence |y - y_exact| <= (2^-8 + 2^-18 + K 2^-24)
sum_q |a_q w_q| (the last term bounds fp32 summation over K terms), plus the output's own rounding for bf16 output.
The oracle is float64 on what the kernel sees (x as given, W dequantized in fp32), as in test_nf4_cpu.py.
"""

from __future__ import annotations

import pytest
import torch
from phi3fast.kernels import nf4_cpu
from phi3fast.kernels.backend import KernelInputError

from phi3fast.quant import quantize_nf4

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="native module built without the NF4 kernels")
needs_bf16 = pytest.mark.skipif(not nf4_cpu.bf16_compute_supported(), reason="CPU without AVX512-BF16")

WEIGHTS = [(96, 160, 32), (160, 96, 32), (192, 320, 64)]
MS = (17, 29, 130)  # > 16: the GEMM path; 29 and 130 leave partial 12-row tiles


def assert_within_bf16_bound(y: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """y vs sum of left @ right over `terms` (float64), within the bf16-product bound of the module note."""
    exact = sum(left.double() @ right.double() for left, right in terms)
    mags = sum(left.double().abs() @ right.double().abs() for left, right in terms)
    k = sum(left.shape[-1] for left, _ in terms)
    bound = (2.0**-8 + 2.0**-18 + k * 2.0**-24) * mags + 1e-30
    if y.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * exact.abs()
    err = (y.double() - exact).abs()
    assert bool((err <= bound).all()), f"max err/bound {float((err / bound).max()):.3f}"


@needs_bf16
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n,k,bs", WEIGHTS)
def test_linear_bf16_within_bound(dtype: torch.dtype, n: int, k: int, bs: int) -> None:
    w = quantize_nf4(torch.randn(n, k), blocksize=bs)
    wd = w.dequantize(torch.float32)
    for m in MS:
        x = torch.randn(m, k).to(dtype)
        y = nf4_cpu.linear(x, w, compute="bf16")
        assert y.dtype == dtype and y.shape == (m, n)
        assert_within_bf16_bound(y, [(x, wd.t())])
        assert not torch.equal(y, nf4_cpu.linear(x, w, compute="fp32"))  # the bf16 kernel did run


@needs_bf16
@pytest.mark.parametrize("r", (5, 16))
def test_linear_bf16_lora_fused(r: int) -> None:
    n, k = 160, 96
    w = quantize_nf4(torch.randn(n, k), blocksize=32, double_quant=False)
    wd = w.dequantize(torch.float32)
    a, b = torch.randn(r, k), torch.randn(n, r)
    for m in MS:
        x = torch.randn(2, m, k)
        t = x @ a.t()
        y = nf4_cpu.linear(x, w, (t, b, 0.37), compute="bf16")
        assert y.shape == (2, m, n)
        assert_within_bf16_bound(
            y.reshape(-1, n), [(x.reshape(-1, k), wd.t()), (0.37 * t.reshape(-1, r), b.t())]
        )


@needs_bf16
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n,k,bs", WEIGHTS)
def test_dx_bf16_within_bound(dtype: torch.dtype, n: int, k: int, bs: int) -> None:
    w = quantize_nf4(torch.randn(n, k), blocksize=bs)
    wd = w.dequantize(torch.float32)
    r = 7
    a, b = torch.randn(r, k), torch.randn(n, r)
    for m in (3, *MS):  # dX takes the bf16 GEMM at every M
        g = torch.randn(m, n).to(dtype)
        assert_within_bf16_bound(nf4_cpu.dx(g, w, compute="bf16"), [(g, wd)])
        u = g.float() @ b
        got = nf4_cpu.dx(g, w, (u, a, 2.0), compute="bf16")
        assert_within_bf16_bound(got, [(g, wd), (2.0 * u, a)])


def test_fp32_where_bf16_cannot_run() -> None:
    """Below AVX-512 (the PHI3FAST_SIMD cap, or simd=) and for decode's small M, 'bf16' computes exactly fp32."""
    w = quantize_nf4(torch.randn(192, 320), blocksize=64)
    x, g = torch.randn(40, 320), torch.randn(40, 192)
    for simd in ("avx2", "scalar"):
        if simd not in nf4_cpu._native.supported_simd_levels():
            continue
        assert torch.equal(nf4_cpu.linear(x, w, simd=simd, compute="bf16"), nf4_cpu.linear(x, w, simd=simd))
        assert torch.equal(nf4_cpu.dx(g, w, simd=simd, compute="bf16"), nf4_cpu.dx(g, w, simd=simd))
    small = torch.randn(16, 320)
    assert torch.equal(nf4_cpu.linear(small, w, compute="bf16"), nf4_cpu.linear(small, w))


@needs_bf16
def test_mode_from_context_and_environment(monkeypatch) -> None:
    w = quantize_nf4(torch.randn(192, 320), blocksize=64)
    x = torch.randn(40, 320)
    fp32, bf16 = nf4_cpu.linear(x, w, compute="fp32"), nf4_cpu.linear(x, w, compute="bf16")
    assert torch.equal(nf4_cpu.linear(x, w), fp32)  # the default
    with nf4_cpu.compute_mode("bf16"):
        assert torch.equal(nf4_cpu.linear(x, w), bf16)
        assert torch.equal(nf4_cpu.linear(x, w, compute="fp32"), fp32)  # an explicit argument wins
    monkeypatch.setenv("PHI3FAST_NF4_COMPUTE", "bf16")
    assert torch.equal(nf4_cpu.linear(x, w), bf16)
    with nf4_cpu.compute_mode("fp32"):  # a block wins over the environment
        assert torch.equal(nf4_cpu.linear(x, w), fp32)


@needs_bf16
def test_bf16_thread_count_does_not_change_results() -> None:
    w = quantize_nf4(torch.randn(192, 320), blocksize=64)
    x, g = torch.randn(45, 320), torch.randn(45, 192)
    assert torch.equal(
        nf4_cpu.linear(x, w, threads=1, compute="bf16"), nf4_cpu.linear(x, w, threads=2, compute="bf16")
    )
    assert torch.equal(
        nf4_cpu.dx(g, w, threads=1, compute="bf16"), nf4_cpu.dx(g, w, threads=3, compute="bf16")
    )


def test_bad_mode_is_a_clear_error(monkeypatch) -> None:
    w = quantize_nf4(torch.randn(64, 128), blocksize=64)
    x = torch.randn(20, 128)
    with pytest.raises(KernelInputError, match="compute mode 'fp16'"):
        nf4_cpu.linear(x, w, compute="fp16")
    with pytest.raises(KernelInputError, match="compute mode 'int8'"):
        with nf4_cpu.compute_mode("int8"):
            pass
    monkeypatch.setenv("PHI3FAST_NF4_COMPUTE", "half")
    with pytest.raises(KernelInputError, match="PHI3FAST_NF4_COMPUTE"):
        nf4_cpu.linear(x, w)
