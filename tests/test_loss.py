"""chunked_cross_entropy against F.cross_entropy on full fp32 logits: forward and both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phi3fast.training.loss import IGNORE_INDEX, chunked_cross_entropy

# One tolerance table per dtype (relative to the reference's magnitude).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def reference(hidden, weight, labels):
    logits = hidden.float() @ weight.float().T
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n, h, v, chunk", [(1, 8, 5, 4), (17, 16, 130, 4), (130, 32, 257, 64), (64, 24, 33, 1000)]
)
def test_matches_full_logits(dtype, n, h, v, chunk):
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h) / h**0.5
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < 0.3] = IGNORE_INDEX
    labels[0] = v - 1  # at least one target, at the vocabulary's edge

    h_ref = hidden.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    ref = reference(h_ref, w_ref, labels)
    ref.backward()

    h_x = hidden.to(dtype).requires_grad_()
    w_x = weight.to(dtype).requires_grad_()
    out = chunked_cross_entropy(h_x, w_x, labels, chunk_size=chunk)
    (out * 0.5).backward()  # a non-unit upstream gradient must scale both gradients
    assert out.dtype == torch.float32
    tol = TOL[dtype]
    assert rel(out, ref) < tol
    assert h_x.grad.dtype == dtype and w_x.grad.dtype == dtype
    assert rel(h_x.grad * 2, h_ref.grad) < tol
    assert rel(w_x.grad * 2, w_ref.grad) < tol
    # Rows without a target get exactly zero gradient.
    assert (h_x.grad[labels == IGNORE_INDEX] == 0).all()


def test_frozen_weight_gets_no_grad_and_mean_reduction():
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    labels = torch.tensor([1, 2, IGNORE_INDEX, 3, 4, 5, IGNORE_INDEX, 6, 7])
    out = chunked_cross_entropy(hidden, weight, labels, chunk_size=2, reduction="mean")
    out.backward()
    assert weight.grad is None
    ref = F.cross_entropy(hidden.detach() @ weight.T, labels, ignore_index=IGNORE_INDEX)
    assert torch.allclose(out, ref, rtol=1e-5)


def test_custom_ignore_index_and_no_targets():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(6, 8)
    labels = torch.tensor([0, -1, 3, -1])
    out = chunked_cross_entropy(hidden, weight, labels, ignore_index=-1)
    ref = F.cross_entropy(hidden.detach() @ weight.T, labels, ignore_index=-1, reduction="sum")
    assert torch.allclose(out, ref, rtol=1e-5)
    none = chunked_cross_entropy(hidden, weight, torch.full((4,), IGNORE_INDEX))
    none.backward()
    assert float(none.detach()) == 0.0 and (hidden.grad == 0).all()


def test_no_grad_path_equals_grad_path():
    hidden, weight = torch.randn(17, 8), torch.randn(13, 8)
    labels = torch.randint(0, 13, (17,))
    with torch.no_grad():
        a = chunked_cross_entropy(hidden, weight, labels, chunk_size=5)
    b = chunked_cross_entropy(hidden.requires_grad_(), weight, labels, chunk_size=5)
    assert torch.equal(a, b.detach())


def test_sum_over_chunks_makes_accumulation_exact():
    """Loss of a batch split in two, each divided by the whole batch's count, sums to the full batch's mean."""
    hidden, weight = torch.randn(20, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
    labels = torch.randint(0, 7, (20,))
    labels[:6] = IGNORE_INDEX  # uneven token counts between the halves
    n = int((labels != IGNORE_INDEX).sum())
    full = chunked_cross_entropy(hidden, weight, labels, reduction="mean")
    parts = sum(
        chunked_cross_entropy(hidden[s], weight, labels[s]) / n for s in (slice(0, 10), slice(10, 20))
    )
    assert torch.allclose(full, parts, rtol=1e-6)


@pytest.mark.parametrize("bad", ["shape", "labels", "reduction"])
def test_argument_errors(bad):
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError):
        if bad == "shape":
            chunked_cross_entropy(h, torch.randn(5, 3), y)
        elif bad == "labels":
            chunked_cross_entropy(h, w, torch.zeros(4, dtype=torch.long))
        else:
            chunked_cross_entropy(h, w, y, reduction="none")
