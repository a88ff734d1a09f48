"""NF4 dequant and dequant-matmul: Triton (interpreter on CPU) and torch paths against fp32 oracles.

Oracles: bitsandbytes' own dequantize_4bit / matmul_4bit on the same packed tensors (an independent
implementation of the format), and fp32 torch matmuls. TOL below is the single tolerance table of the kernel tests
(test_kernels_lora.py imports it).
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from phi3fast.kernels import nf4, nf4_dequantize, nf4_matmul
from phi3fast.kernels import nf4_reference as reference
from phi3fast.kernels.backend import KernelInputError

from phi3fast.quant import NF4Weight, quantize_nf4

# (atol, rtol) per dtype: |actual - expected| <= atol * max|expected| + rtol * |expected|, against an fp32 oracle
# computed from the same inputs the kernel sees (x and the dequantized W, each rounded once to the dtype). atol is
# relative to the largest reference value because a dot product's rounding error scales with the size of its
# terms, not of its (possibly cancelled) result. fp32: reduction order only; fp16 (2^-11) and bf16 (2^-8): a few
# units of roundoff from rounding the outputs and the skinny LoRA intermediates (t = x A^T, u = dY B).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
INTERP_DTYPES = (torch.float32, torch.float16)  # the interpreter cannot do bf16 dots


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    expected = expected.detach().float()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().float(), expected, atol=atol * scale, rtol=rtol)


def bnb_weight(n: int, k: int, blocksize: int = 64, double_quant: bool = True):
    """(NF4Weight wrapping bitsandbytes' quantize_4bit tensors, bnb packed, bnb QuantState)."""
    q, st = bnbf.quantize_4bit(torch.randn(n, k), blocksize=blocksize, quant_type="nf4",
                               compress_statistics=double_quant)  # fmt: skip
    if double_quant:
        w = NF4Weight(q, st.absmax, st.code, st.state2.absmax, st.state2.code, st.offset, blocksize, (n, k),
                      torch.float32, True)  # fmt: skip
    else:
        w = NF4Weight(q, st.absmax, st.code, None, None, None, blocksize, (n, k), torch.float32, False)
    return w, q, st


SHAPES = [(64, 128), (192, 256), (128, 64)]  # (N, K): N=64/192 leave part of a 128-wide N tile masked


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("n,k", [(128, 256), (256, 128)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dequantize_matches_bitsandbytes(
    backend: str, n: int, k: int, blocksize: int, double_quant: bool
) -> None:
    w, q, st = bnb_weight(n, k, blocksize, double_quant)
    expected = bnbf.dequantize_4bit(q, st)  # fp32 (the original dtype)
    assert torch.equal(nf4_dequantize(w, torch.float32, backend=backend), expected)
    # One rounding from the exact fp32 value, as bitsandbytes does for 16-bit weights.
    assert torch.equal(nf4_dequantize(w, torch.float16, backend=backend), expected.half())
    if backend == "torch":
        assert torch.equal(nf4_dequantize(w, torch.bfloat16, backend=backend), expected.bfloat16())


@pytest.mark.parametrize(
    "n,k,m,dtype,double_quant",
    [(n, k, m, dtype, True) for n, k in SHAPES[:2] for m in (1, 3, 16, 17, 33) for dtype in INTERP_DTYPES]
    + [(128, 64, m, torch.float32, False) for m in (1, 17)],
)
def test_matmul_triton(n: int, k: int, m: int, dtype: torch.dtype, double_quant: bool) -> None:
    """M <= 16 runs the split-K decode kernel, M > 16 the fused GEMM; both against fp32 x @ W^T."""
    w, q, st = bnb_weight(n, k, 64, double_quant)
    x = torch.randn(m, k).to(dtype)
    y = nf4_matmul(x, w, backend="triton")
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, x.float() @ bnbf.dequantize_4bit(q, st).to(dtype).float().t(), dtype)


@pytest.mark.parametrize("m", [2, 40])
def test_matmul_blocksize_128_and_leading_dims(m: int) -> None:
    """blocksize 128: two K-tiles share one absmax; x [2, m/2, K] keeps its leading dims."""
    w, q, st = bnb_weight(128, 256, 128)
    x = torch.randn(2, m // 2, 256)
    y = nf4_matmul(x, w, backend="triton")
    assert y.shape == (2, m // 2, 128)
    assert_close(y, x @ bnbf.dequantize_4bit(q, st).t(), torch.float32)


def test_matmul_matches_bitsandbytes_matmul_4bit() -> None:
    w, q, st = bnb_weight(192, 256)
    x = torch.randn(5, 256)
    expected = bnb.matmul_4bit(x, q.t(), quant_state=st)
    assert_close(nf4_matmul(x, w, backend="triton"), expected, torch.float32)
    assert_close(nf4_matmul(x, w, backend="torch"), expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17])
def test_matmul_torch_path(m: int, dtype: torch.dtype) -> None:
    """The CPU runtime path (backend='auto' on CPU is the torch reference) in fp32 and bf16."""
    w = quantize_nf4(torch.randn(128, 192))
    x = torch.randn(m, 192).to(dtype)
    y = nf4_matmul(x, w)
    assert y.dtype == dtype
    assert_close(y, x.float() @ w.dequantize(dtype).float().t(), dtype)


def test_large_m_dequant_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dequant + matmul alternative for large M gives the same result as the fused kernel."""
    w, q, st = bnb_weight(192, 128)
    x = torch.randn(33, 128)
    fused = nf4_matmul(x, w, backend="triton")
    monkeypatch.setattr(nf4, "LARGE_M_PATH", "dequant")
    assert_close(nf4_matmul(x, w, backend="triton"), fused, torch.float32)
    assert_close(fused, x @ bnbf.dequantize_4bit(q, st).t(), torch.float32)


def test_matmul_empty_batch() -> None:
    w = quantize_nf4(torch.randn(64, 64))
    assert nf4_matmul(torch.randn(0, 64), w, backend="triton").shape == (0, 64)


# ---- errors ------------------------------------------------------------------------------------------------------


def test_k_not_multiple_of_blocksize() -> None:
    w = quantize_nf4(torch.randn(64, 96), blocksize=64)  # valid for bitsandbytes (flat blocks), not for tiles
    with pytest.raises(KernelInputError, match=r"K=96 and N=64 must both be multiples of the blocksize 64"):
        nf4_matmul(torch.randn(2, 96), w, backend="triton")
    with pytest.raises(KernelInputError, match="multiples of the blocksize"):
        nf4_dequantize(w, backend="torch")


def test_n_not_multiple_of_blocksize() -> None:
    w = quantize_nf4(torch.randn(96, 128), blocksize=64)
    with pytest.raises(KernelInputError, match=r"N=96 must both be multiples"):
        nf4_matmul(torch.randn(2, 128), w)


def test_x_wrong_width_and_dtype() -> None:
    w = quantize_nf4(torch.randn(64, 128))
    with pytest.raises(KernelInputError, match=r"x of shape \(2, 64\): the last dimension must be K=128"):
        nf4_matmul(torch.randn(2, 64), w, backend="triton")
    with pytest.raises(KernelInputError, match="floating-point"):
        nf4_matmul(torch.ones(2, 128, dtype=torch.int64), w)


def test_bad_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    w = quantize_nf4(torch.randn(64, 128))
    with pytest.raises(KernelInputError, match="backend='cuda': expected one of"):
        nf4_matmul(torch.randn(2, 128), w, backend="cuda")
    with pytest.raises(KernelInputError, match="interpreter, which cannot compute in bf16"):
        nf4_matmul(torch.randn(2, 128).bfloat16(), w, backend="triton")
    with pytest.raises(KernelInputError, match="interpreter, which cannot compute in bf16"):
        nf4_dequantize(w, torch.bfloat16, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelInputError, match="needs Triton's interpreter"):
        nf4_matmul(torch.randn(2, 128), w, backend="triton")


def test_auto_on_cpu_is_native_or_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend='auto' on CPU runs the native kernels (the torch reference without them), never the (slow)
    interpreter."""
    from phi3fast.kernels import nf4_cpu

    w = quantize_nf4(torch.randn(64, 128))
    x = torch.randn(3, 128)

    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail("backend='auto' ran a Triton launcher on CPU")

    monkeypatch.setattr(nf4, "matmul_triton", fail)
    monkeypatch.setattr(nf4, "dequantize_triton", fail)
    if nf4_cpu.available():
        assert torch.equal(nf4_matmul(x, w), nf4_cpu.linear(x, w))
        assert_close(nf4_matmul(x, w), reference.nf4_matmul(x, w), torch.float32)
    monkeypatch.setattr(nf4_cpu, "available", lambda: False)
    assert torch.equal(nf4_matmul(x, w), reference.nf4_matmul(x, w))
    assert torch.equal(nf4_dequantize(w), reference.dequantize(w, torch.bfloat16))


# ---- GPU (bf16) --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 17, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_cuda(m: int, dtype: torch.dtype) -> None:
    w = quantize_nf4(torch.randn(3 * 1024, 1024, device="cuda"))
    x = torch.randn(m, 1024, device="cuda").to(dtype)
    expected = x.float() @ w.dequantize(dtype).float().t()
    assert_close(nf4_matmul(x, w), expected, dtype)
    assert torch.equal(nf4_dequantize(w, dtype), w.dequantize(dtype))


@pytest.mark.gpu
def test_fp32_on_cuda() -> None:
    """fp32 activations: 'auto' runs the torch path; 'triton' (fp16/bf16 GEMMs only) says so."""
    w = quantize_nf4(torch.randn(256, 256, device="cuda"))
    x = torch.randn(4, 256, device="cuda")
    assert_close(nf4_matmul(x, w), x @ w.dequantize().t(), torch.float32)
    with pytest.raises(KernelInputError, match="takes fp16 or bf16 activations"):
        nf4_matmul(x, w, backend="triton")
