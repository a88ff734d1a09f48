"""GEMM kernels at row offsets past 2^31 elements, and autotune keyed on the NF4 blocksize (interpreter on CPU).

Offsets: a wide GEMM's `row * stride` passes 2^31 elements at ~60k rows (Phi-3-medium's gate_up). Allocating that
is out of reach here, so the activations are a strided view into a lazily committed mapping: rows lie 2^28
elements apart, so `row * stride` passes 2^31 from row 8 on, and only the touched pages take memory. The view
starts 2^32 elements into the mapping, so a 32-bit offset that wraps still lands inside it (zeros, a wrong
result) instead of faulting. The interpreter computes offsets in numpy's int32, so it wraps exactly as the GPU
does in the compiled kernel.
"""

from __future__ import annotations

import mmap

import pytest
import torch
from phi3fast.kernels import lora as lora_kernels
from phi3fast.kernels import lora_linear, nf4, nf4_matmul
from test_kernels_nf4 import assert_close, bnb_weight

ROW_STRIDE = 2**28  # elements between rows: row 8 starts at 2^31
VIEW_START = 2**32  # elements before the view: a wrapped (negative) 32-bit offset stays inside the mapping


@pytest.fixture
def far_rows():
    """far_rows(m, k) -> an fp32 [m, k] view with rows ROW_STRIDE elements apart, filled with random values."""
    maps = []

    def make(m: int, k: int) -> torch.Tensor:
        n_elems = VIEW_START + (m - 1) * ROW_STRIDE + k
        noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python < 3.12 does not name it
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve
        buf = mmap.mmap(-1, 4 * n_elems, flags=flags)
        maps.append(buf)
        flat = torch.frombuffer(buf, dtype=torch.float32)
        view = flat.as_strided((m, k), (ROW_STRIDE, 1), VIEW_START)
        view.copy_(torch.randn(m, k))
        return view

    yield make
    # The tensors over the mappings are gone with the test's frame; the mappings close when unreferenced.
    maps.clear()


def test_nf4_matmul_rows_past_2_31_elements(far_rows) -> None:
    m, n, k = 20, 64, 64  # M > 16: the fused kernel, whose M-tile covers rows 0..19 (8..19 past 2^31)
    x = far_rows(m, k)
    assert (m - 1) * x.stride(0) >= 2**31
    w, _, _ = bnb_weight(n, k)
    out = nf4_matmul(x, w, backend="triton")
    assert_close(
        out, x.contiguous() @ nf4.nf4_dequantize(w, torch.float32, backend="torch").t(), torch.float32
    )


def test_lora_backward_rows_past_2_31_elements(far_rows) -> None:
    """dX = dY W + scale * (dY B) A through `_lora_dx_kernel`, with dY's rows past 2^31 elements."""
    m, n, k, r = 20, 64, 64, 16
    w, _, _ = bnb_weight(n, k)
    x = torch.randn(m, k, requires_grad=True)
    a = torch.randn(r, k) / 8
    b = torch.randn(n, r) / 8
    out = lora_linear(x, w, a, b, 0.5, backend="triton")
    g = far_rows(m, n)
    (dx,) = torch.autograd.grad(out, x, g)
    dense = nf4.nf4_dequantize(w, torch.float32, backend="torch")
    expected = g.contiguous() @ dense + 0.5 * (g.contiguous() @ b) @ a
    assert_close(dx, expected, torch.float32)


def _two_tile_widths(kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Give an autotuned kernel a BLOCK_K=64 and a BLOCK_K=32 config, with a fixed 'timing' that prefers 64,
    and an empty cache."""
    import triton

    base = kernel.configs[0]
    configs = [triton.Config({**base.kwargs, "BLOCK_K": bk}, num_warps=base.num_warps, num_stages=base.num_stages)
               for bk in (64, 32)]  # fmt: skip
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(
        kernel, "_bench", lambda *a, config, **kw: [1.0 if config.kwargs["BLOCK_K"] == 64 else 2.0]
    )


def test_autotune_cache_keyed_on_blocksize(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same shapes with blocksize 64 then 32 in one process: a BLOCK_K=64 tile tuned for the first must not
    serve the second (it would apply one absmax to two blocks)."""
    _two_tile_widths(nf4._nf4_matmul_kernel, monkeypatch)
    _two_tile_widths(lora_kernels._lora_dx_kernel, monkeypatch)
    m, n, k, r = 24, 64, 128, 16
    for blocksize in (64, 32):
        w, _, _ = bnb_weight(n, k, blocksize=blocksize)
        dense = nf4.nf4_dequantize(w, torch.float32, backend="torch")
        x = torch.randn(m, k)
        assert_close(nf4_matmul(x, w, backend="triton"), x @ dense.t(), torch.float32)
        x.requires_grad_(True)
        a, b = torch.randn(r, k) / 8, torch.randn(n, r) / 8
        g = torch.randn(m, n)
        (dx,) = torch.autograd.grad(lora_linear(x, w, a, b, 0.5, backend="triton"), x, g)
        assert_close(dx, g @ dense + 0.5 * (g @ b) @ a, torch.float32)
    chosen = {c.kwargs["BLOCK_K"] for c in nf4._nf4_matmul_kernel.cache.values()}
    assert chosen == {64, 32}  # both widths ran: the test exercised the hazard
