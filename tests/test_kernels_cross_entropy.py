"""fused_linear_cross_entropy (Triton row kernel, interpreter on CPU) against F.cross_entropy on fp32 logits:
loss, dH and dW, in fp32 and fp16, on odd shapes, both row-kernel paths (whole row in one block, looped)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from phi3fast.kernels import cross_entropy as ce
from phi3fast.kernels import fused_linear_cross_entropy
from phi3fast.kernels.backend import KernelInputError

from phi3fast.training.loss import IGNORE_INDEX, chunked_cross_entropy

# The one tolerance table: ||out - ref|| / ||ref|| for the loss, dH and dW against the fp32 reference built from
# the same (rounded) inputs. fp32: summation-order noise (measured <= 1.3e-7 over the shapes below). fp16: the
# logits and the gradient are stored in fp16; logits up to ~10 round by up to 2.4e-3 absolute, which moves the
# softmax by about that much relative (measured <= 1.4e-3).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def make(n: int, v: int, h: int, ignored: float = 0.3):
    hidden = torch.randn(n, h)
    weight = (
        torch.randn(v, h) / h**0.5 * 3
    )  # logits of a few units: a peaked softmax, as a trained lm_head gives
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < ignored] = IGNORE_INDEX
    labels[0] = v - 1  # at least one target, at the vocabulary's edge
    return hidden, weight, labels


def check(dtype, hidden, weight, labels, *, ignore_index=IGNORE_INDEX, reduction="sum", chunk_size=None,
          backend="triton", upstream=0.5):  # fmt: skip
    """Loss and both gradients of the op (in dtype) against F.cross_entropy over fp32 logits of the same inputs."""
    h_ref = hidden.to(dtype).float().requires_grad_()
    w_ref = weight.to(dtype).float().requires_grad_()
    ref = F.cross_entropy(h_ref @ w_ref.T, labels, ignore_index=ignore_index, reduction=reduction)
    (ref * upstream).backward()

    h_x = hidden.to(dtype).requires_grad_()
    w_x = weight.to(dtype).requires_grad_()
    out = fused_linear_cross_entropy(h_x, w_x, labels, ignore_index, chunk_size, reduction, backend)
    (out * upstream).backward()  # a non-unit upstream gradient must scale both gradients
    assert out.dtype == torch.float32 and out.dim() == 0
    assert h_x.grad.dtype == dtype and w_x.grad.dtype == dtype
    tol = TOL[dtype]
    assert rel(out, ref) < tol, (float(out), float(ref))
    assert rel(h_x.grad, h_ref.grad) < tol
    assert rel(w_x.grad, w_ref.grad) < tol
    assert (h_x.grad[labels == ignore_index] == 0).all()  # rows without a target: exactly zero
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h", [16, 40])
@pytest.mark.parametrize("v", [17, 130, 1030])
@pytest.mark.parametrize("n", [1, 7, 33])
def test_matches_fp32_reference(dtype, n, v, h):
    hidden, weight, labels = make(n, v, h)
    check(dtype, hidden, weight, labels, chunk_size=4)  # several chunks, the last one partial


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v", [17, 1030, 2500])
def test_looped_row_kernel(monkeypatch, dtype, v):
    """Rows wider than one block: the online log-sum-exp over 128-wide blocks (last block partial), then the
    gradient pass. V=17 is one partial block, 2500 twenty blocks."""
    monkeypatch.setattr(ce, "ONE_BLOCK_MAX", 1024)
    monkeypatch.setattr(ce, "LOOP_BLOCK", 128)
    assert not ce.row_config(v)[1]
    hidden, weight, labels = make(9, v, 16)
    check(dtype, hidden, weight, labels)


def test_row_config_covers_phi3_vocab_in_one_block():
    assert ce.row_config(32064) == (32768, True, 32)
    assert ce.row_config(17) == (ce.ONE_BLOCK_MIN, True, 4)
    assert ce.row_config(100352) == (ce.LOOP_BLOCK, False, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mean_and_custom_ignore_index(dtype):
    hidden, weight, _ = make(13, 130, 16)
    # ignore_index 3 is also a real token id: positions labelled 3 must be skipped, the others kept.
    labels = torch.tensor([3, 0, 129, 3, 7, 3, 64, 1, 3, 2, 3, 5, 6])
    check(dtype, hidden, weight, labels, ignore_index=3, reduction="mean", chunk_size=3)
    check(dtype, hidden, weight, labels.masked_fill(labels == 3, -1), ignore_index=-1, reduction="sum")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_rows_ignored(reduction):
    hidden = torch.randn(5, 16, requires_grad=True)
    weight = torch.randn(130, 16, requires_grad=True)
    out = fused_linear_cross_entropy(hidden, weight, torch.full((5,), IGNORE_INDEX), reduction=reduction,
                                     backend="triton")  # fmt: skip
    out.backward()
    assert float(out.detach()) == 0.0
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_frozen_weight_gets_no_grad_and_no_grad_path_matches():
    hidden, weight, labels = make(11, 130, 16)
    hidden.requires_grad_()
    out = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4, backend="triton")
    out.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        again = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4, backend="triton")
    assert torch.equal(again, out.detach())  # the loss-only kernel variant gives the same bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_equals_torch_backend(dtype):
    """Both backends share the chunk loop; only the row math differs, so they agree to rounding."""
    hidden, weight, labels = make(33, 1030, 40)
    outs = []
    for backend in ("triton", "torch"):
        h = hidden.to(dtype).requires_grad_()
        loss = chunked_cross_entropy(h, weight.to(dtype), labels, chunk_size=8, backend=backend)
        loss.backward()
        outs.append((loss.detach(), h.grad))
    assert rel(outs[0][0], outs[1][0]) < 1e-6
    assert rel(outs[0][1], outs[1][1]) < TOL[dtype] / 4


def test_auto_on_cpu_runs_the_torch_rows(monkeypatch):
    def no_kernel(*args):
        raise AssertionError("backend='auto' on CPU must not run the Triton kernel")

    monkeypatch.setattr(ce, "ce_rows_triton", no_kernel)
    hidden, weight, labels = make(7, 17, 16)
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    assert rel(fused_linear_cross_entropy(hidden, weight, labels), ref) < TOL[torch.float32]


def test_errors():
    hidden, weight, labels = make(4, 17, 16, ignored=0.0)
    with pytest.raises(ValueError, match=r"labels\[2\] = 17 is outside the vocabulary \[0, 17\)"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 17, 2]), backend="triton")
    with pytest.raises(ValueError, match="share a dtype"):
        fused_linear_cross_entropy(hidden.half(), weight, labels)
    with pytest.raises(KernelInputError, match="backend='cuda'"):
        fused_linear_cross_entropy(hidden, weight, labels, backend="cuda")
    with pytest.raises(KernelInputError, match="cannot compute in bf16"):
        fused_linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("v", [130, 32064, 40000])
def test_bf16_on_gpu(v):
    hidden, weight, labels = make(300, v, 64)
    dev = torch.device("cuda")
    h_ref = hidden.cuda().bfloat16().float().requires_grad_()
    ref = F.cross_entropy(h_ref @ weight.cuda().bfloat16().float().T, labels.cuda(), reduction="sum")
    ref.backward()
    h_x = hidden.to(dev, torch.bfloat16).requires_grad_()
    out = fused_linear_cross_entropy(h_x, weight.to(dev, torch.bfloat16), labels.cuda())
    out.backward()
    # bf16 logits and gradient: 2^-8 relative rounding.
    assert rel(out, ref) < 1e-2 and rel(h_x.grad, h_ref.grad) < 1e-2


@pytest.mark.slow
def test_aot_phi3_configs_compile_without_spills():
    """The row kernel at Phi-3's vocabulary (one 32768 block, 32 warps) and the looped kernel compile offline for
    sm_80 and sm_90 with no spills; `python -m phi3fast.kernels.report --match cross_entropy` compiles them all."""
    from aot_helpers import compile_report

    match = r"cross_entropy_rows bf16,BLOCK_V=(32768,ONE_BLOCK=1|4096,ONE_BLOCK=0)"
    rows = compile_report(match)  # checks every row: compiled, no spills
    assert len(rows) == 8 and {r["arch"] for r in rows} == {"sm_80", "sm_90"}
