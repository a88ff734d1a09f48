"""lora_linear: forward and every gradient (x, x_lora, A, B) against fp32 autograd on the dequantized weight,
PEFT as a peer oracle, the frozen NF4 weight, the dequantize-once rule and the error paths."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from phi3fast.kernels import lora_linear, nf4
from phi3fast.kernels import nf4_reference as reference
from phi3fast.kernels.backend import KernelInputError
from test_kernels_nf4 import INTERP_DTYPES, assert_close, bnb_weight

from phi3fast.quant import quantize_nf4

SCALE = 2.0  # alpha / r = 32 / 16, the project default


def oracle(x, w_dense, a, b, scale, x_lora=None):
    """fp32 autograd on the inputs the kernel sees (each rounded once to its dtype, then upcast)."""
    leaves = [t.detach().float().requires_grad_() for t in (x, a, b)]
    xl = None if x_lora is None else x_lora.detach().float().requires_grad_()
    xf, af, bf = leaves
    y = xf @ w_dense.t() + scale * ((xf if xl is None else xl) @ af.t()) @ bf.t()
    return y, [xf, af, bf, xl]


def run_case(
    m: int, n: int, k: int, r: int, dtype: torch.dtype, backend: str, separate: bool, dq: bool = True
):
    w, q, st = bnb_weight(n, k, 64, dq)
    w_dense = bnbf.dequantize_4bit(q, st).to(dtype).float()
    x = torch.randn(m, k).to(dtype).requires_grad_()
    x_lora = torch.randn(m, k).to(dtype).requires_grad_() if separate else None
    a = (torch.randn(r, k) / k**0.5).to(dtype).requires_grad_()
    b = torch.randn(n, r).to(dtype).requires_grad_()
    g = torch.randn(m, n).to(dtype)
    y = lora_linear(x, w, a, b, SCALE, x_lora=x_lora, backend=backend)
    y.backward(g)
    y_ref, (xf, af, bf, xlf) = oracle(x, w_dense, a, b, SCALE, x_lora)
    y_ref.backward(g.float())
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, y_ref, dtype)
    assert_close(x.grad, xf.grad, dtype)
    assert_close(a.grad, af.grad, dtype)
    assert_close(b.grad, bf.grad, dtype)
    if separate:
        assert_close(x_lora.grad, xlf.grad, dtype)
    # The frozen weight: not a parameter, never grad-tracked, nothing accumulated on it.
    assert not any(t.requires_grad for t in (w.packed, w.absmax, w.code) if t is not None)
    assert w.packed.grad is None and w.absmax.grad is None


@pytest.mark.parametrize(
    "m,n,k,r,dtype,separate",
    [(m, 192, 128, 16, dtype, False) for m in (1, 17, 33) for dtype in INTERP_DTYPES]
    + [(m, 64, 256, 8, torch.float32, True) for m in (3, 40)]
    + [(m, 128, 64, 40, torch.float32, False) for m in (5, 20)]  # rank 40: three rank chunks, the last masked
    + [(17, 128, 64, 16, torch.float16, True)],
)
def test_lora_triton(m: int, n: int, k: int, r: int, dtype: torch.dtype, separate: bool) -> None:
    """M <= 16 runs the decode kernel in the forward; the dX kernel runs for every M."""
    run_case(m, n, k, r, dtype, "triton", separate)


def test_lora_triton_without_double_quant() -> None:
    run_case(20, 128, 128, 4, torch.float32, "triton", separate=False, dq=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("separate", [False, True])
def test_lora_torch_path(dtype: torch.dtype, separate: bool) -> None:
    """The CPU runtime path (backend='auto' on CPU) in fp32 and bf16."""
    run_case(33, 128, 192, 16, dtype, "auto", separate)


def test_lora_leading_dims_and_fp32_adapters_over_fp16() -> None:
    """x [B, T, K] in fp16 with fp32 adapters (as training keeps them): grads come back in each input's dtype."""
    w = quantize_nf4(torch.randn(128, 64))
    x = torch.randn(2, 9, 64).half().requires_grad_()
    a = (torch.randn(8, 64) / 8).requires_grad_()
    b = torch.randn(128, 8).requires_grad_()
    y = lora_linear(x, w, a, b, 0.5, backend="triton")
    assert y.shape == (2, 9, 128) and y.dtype == torch.float16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float16 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    y_ref, (xf, af, bf, _) = oracle(x, w.dequantize(torch.float16).float(), a.half(), b.half(), 0.5)
    y_ref.sum().backward()
    for got, want in ((y, y_ref), (x.grad, xf.grad), (a.grad, af.grad), (b.grad, bf.grad)):
        assert_close(got, want, torch.float16)


def test_only_adapters_trainable() -> None:
    """x without grad (the first layer's input): backward skips dX entirely and still gives dA, dB."""
    w = quantize_nf4(torch.randn(64, 128))
    x = torch.randn(5, 128)
    a = torch.randn(4, 128, requires_grad=True)
    b = torch.randn(64, 4, requires_grad=True)
    lora_linear(x, w, a, b, 1.0, backend="triton").sum().backward()
    y_ref, (_, af, bf, _) = oracle(x, w.dequantize(), a, b, 1.0)
    y_ref.sum().backward()
    assert x.grad is None
    assert_close(a.grad, af.grad, torch.float32)
    assert_close(b.grad, bf.grad, torch.float32)


@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_dequantize_once_per_pass(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The fused kernels never materialize W; the dequant + matmul path dequantizes it once in the forward and
    once in the backward (dX), never twice. The torch path decodes each weight once per pass (in chunks)."""
    n, k = 64, 128
    w = quantize_nf4(torch.randn(n, k))
    calls = {"triton": 0, "torch_elements": 0}
    real_triton, real_tile = nf4.dequantize_triton, reference.dequantize_tile

    def count_triton(*args, **kwargs):
        calls["triton"] += 1
        return real_triton(*args, **kwargs)

    def count_tile(*args, **kwargs):
        out = real_tile(*args, **kwargs)
        calls["torch_elements"] += out.numel()
        return out

    monkeypatch.setattr(nf4, "dequantize_triton", count_triton)
    monkeypatch.setattr(reference, "dequantize_tile", count_tile)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2048)  # several chunks per pass
    monkeypatch.setattr(nf4, "LARGE_M_PATH", path)
    x = torch.randn(40, k, requires_grad=True)
    a = torch.randn(4, k, requires_grad=True)
    b = torch.randn(n, 4, requires_grad=True)
    y = lora_linear(x, w, a, b, 1.0, backend="triton")
    assert calls["triton"] == (1 if path == "dequant" else 0)
    y.sum().backward()
    assert calls["triton"] == (2 if path == "dequant" else 0) and calls["torch_elements"] == 0
    y = lora_linear(x, w, a, b, 1.0, backend="torch")
    assert calls["torch_elements"] == n * k
    y.sum().backward()
    assert calls["torch_elements"] == 2 * n * k


def test_torch_path_chunks_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked decoding (rows for the forward, columns for dX) equals the one-shot dequantized weight exactly."""
    w = quantize_nf4(torch.randn(192, 256))
    x, g = torch.randn(5, 256), torch.randn(5, 192)
    whole = (reference.nf4_matmul(x, w), reference.lora_dx(g, w, None))
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 4096)  # 16 row chunks, 4 column chunks of 64
    for got, want in zip((reference.nf4_matmul(x, w), reference.lora_dx(g, w, None)), whole, strict=True):
        assert_close(got, want, torch.float32)
    assert torch.equal(reference.dequantize(w, torch.bfloat16), w.dequantize(torch.bfloat16))


def test_matches_peft() -> None:
    """PEFT's LoRA (lora_A, lora_B, scaling = alpha / r) on a Linear holding the dequantized weight is a peer oracle."""
    peft = pytest.importorskip("peft")
    n, k, r, alpha = 128, 64, 8, 16
    w = quantize_nf4(torch.randn(n, k))
    base = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
    base[0].weight.data.copy_(w.dequantize())
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0)
    )
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # PEFT starts B at zero; make the test see it
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(7, k, requires_grad=True)
    g = torch.randn(7, n)
    model(x).backward(g)
    want = [x.grad.clone(), a.grad.clone(), b.grad.clone()]
    x.grad = a.grad = b.grad = None
    y = lora_linear(x, w, a, b, alpha / r, backend="triton")
    assert_close(y, model(x), torch.float32)
    y.backward(g)
    for got, ref in zip((x.grad, a.grad, b.grad), want, strict=True):
        assert_close(got, ref, torch.float32)


def test_dense_weight() -> None:
    """--quantize none: a dense frozen W runs as plain matmuls; W gets no grad."""
    wd = torch.randn(64, 128)
    x = torch.randn(3, 128, requires_grad=True)
    a = torch.randn(4, 128, requires_grad=True)
    b = torch.randn(64, 4, requires_grad=True)
    y = lora_linear(x, wd, a, b, 0.5, backend="triton")
    y.sum().backward()
    y_ref, (xf, af, bf, _) = oracle(x, wd, a, b, 0.5)
    y_ref.sum().backward()
    assert wd.grad is None
    for got, want in ((y, y_ref), (x.grad, xf.grad), (a.grad, af.grad), (b.grad, bf.grad)):
        assert_close(got, want, torch.float32)


# ---- errors ------------------------------------------------------------------------------------------------------


def test_shape_errors() -> None:
    w = quantize_nf4(torch.randn(64, 128))
    x, a, b = torch.randn(2, 128), torch.randn(4, 128), torch.randn(64, 4)
    with pytest.raises(KernelInputError, match=r"lora_a of shape \(4, 64\): expected \(r, K=128\)"):
        lora_linear(x, w, torch.randn(4, 64), b, 1.0)
    with pytest.raises(KernelInputError, match=r"lora_b of shape \(64, 8\): expected \(N=64, r=4\)"):
        lora_linear(x, w, a, torch.randn(64, 8), 1.0)
    with pytest.raises(KernelInputError, match="x_lora of shape"):
        lora_linear(x, w, a, b, 1.0, x_lora=torch.randn(3, 128))
    with pytest.raises(KernelInputError, match="the last dimension must be K=128"):
        lora_linear(torch.randn(2, 64), w, a, b, 1.0)
    with pytest.raises(KernelInputError, match="multiples of the blocksize"):
        lora_linear(torch.randn(2, 96), quantize_nf4(torch.randn(64, 96)), torch.randn(4, 96), b, 1.0)
    with pytest.raises(KernelInputError, match="backend='gpu'"):
        lora_linear(x, w, a, b, 1.0, backend="gpu")


# ---- GPU (bf16) --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 300])
def test_lora_cuda_bf16(m: int) -> None:
    w = quantize_nf4(torch.randn(1024, 512, device="cuda"))
    x = torch.randn(m, 512, device="cuda").bfloat16().requires_grad_()
    a = (torch.randn(16, 512, device="cuda") / 16).requires_grad_()
    b = torch.randn(1024, 16, device="cuda").requires_grad_()
    y = lora_linear(x, w, a, b, SCALE)
    y.float().sum().backward()
    y_ref, (xf, af, bf, _) = oracle(
        x, w.dequantize(torch.bfloat16).float(), a.bfloat16(), b.bfloat16(), SCALE
    )
    y_ref.sum().backward()
    for got, want in ((y, y_ref), (x.grad, xf.grad), (a.grad, af.grad), (b.grad, bf.grad)):
        assert_close(got, want, torch.bfloat16)
