"""Row-wise kernels (rms_norm, rope_qkv_, swiglu): Triton (interpreter on CPU) forward and every gradient against
fp32 references, transformers' RoPE (LongRoPE below and above original_max_position_embeddings) as a peer
oracle, the torch/auto paths, bad inputs, and the model switch (set_kernel_backend) on a tiny Phi-3 with LoRA,
gradient checkpointing and the KV cache.

Tolerances: the single kernel table TOL of test_kernels_nf4 (atol relative to the largest reference value)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from aot_helpers import compile_report
from model_helpers import VOCAB, make_tiny
from phi3fast.kernels import rms_norm, rope_qkv_, swiglu
from phi3fast.kernels.backend import KernelInputError
from phi3fast.kernels.rmsnorm import rms_norm_reference
from phi3fast.kernels.rope import rope_reference
from phi3fast.kernels.swiglu import swiglu_reference
from test_kernels_nf4 import INTERP_DTYPES, assert_close

from phi3fast.errors import Phi3FastError
from phi3fast.model import RotaryEmbedding, load
from phi3fast.model.config import config_from_dict

EPS = 1e-5


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).requires_grad_()


def fp32_leaf(t: torch.Tensor) -> torch.Tensor:
    """The fp32 oracle's input: the kernel's input (already rounded to its dtype) upcast, no second rounding."""
    return t.detach().float().requires_grad_()


# ---- RMSNorm -----------------------------------------------------------------------------------------------------


def check_rms_norm(shape: tuple[int, ...], dtype: torch.dtype, w_dtype: torch.dtype, backend: str) -> None:
    h = shape[-1]
    x = leaf(torch.randn(shape) * 3, dtype)
    w = leaf(1 + 0.5 * torch.randn(h), w_dtype)
    y = rms_norm(x, w, EPS, backend)
    g = torch.randn(y.shape).to(y.dtype)
    y.backward(g)
    xf, wf = fp32_leaf(x), fp32_leaf(w)
    y_ref = rms_norm_reference(xf, wf, EPS)
    y_ref.backward(g.float())
    assert y.shape == x.shape and y.dtype == torch.promote_types(dtype, w_dtype)
    assert x.grad.dtype == dtype and w.grad.dtype == w_dtype
    assert_close(y, y_ref, dtype)
    assert_close(x.grad, xf.grad, dtype)
    assert_close(w.grad, wf.grad, dtype)


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("hidden", [17, 130])
def test_rms_norm_triton(rows: int, hidden: int, dtype: torch.dtype) -> None:
    """33 rows over 3 interpreter programs: 11 rows each; 7 rows: 3, 3, 1 (the two-stage dW reduction)."""
    check_rms_norm((rows, hidden), dtype, dtype, "triton")


def test_rms_norm_triton_leading_dims_and_fp32_weight() -> None:
    """x [B, T, H] in fp16 with an fp32 weight (the product promotes to fp32, as torch does)."""
    check_rms_norm((2, 5, 130), torch.float16, torch.float32, "triton")


def test_rms_norm_frozen_weight() -> None:
    """The model's norm weights are frozen: no dW (the kernel skips it), dx still right."""
    x = leaf(torch.randn(7, 130), torch.float32)
    w = 1 + torch.randn(130)
    rms_norm(x, w, EPS, "triton").sum().backward()
    xf = fp32_leaf(x)
    rms_norm_reference(xf, w, EPS).sum().backward()
    assert w.grad is None
    assert_close(x.grad, xf.grad, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [3072, 5120])
def test_rms_norm_bf16_cuda(hidden: int) -> None:
    x = leaf(torch.randn(33, hidden, device="cuda"), torch.bfloat16)
    w = leaf(torch.randn(hidden, device="cuda"), torch.bfloat16)
    y = rms_norm(x, w, EPS, "triton")
    y.float().sum().backward()
    xf, wf = fp32_leaf(x), fp32_leaf(w)
    y_ref = rms_norm_reference(xf, wf, EPS)
    y_ref.sum().backward()
    for got, want in ((y, y_ref), (x.grad, xf.grad), (w.grad, wf.grad)):
        assert_close(got, want, torch.bfloat16)


# ---- RoPE --------------------------------------------------------------------------------------------------------


def check_rope(
    b: int,
    t: int,
    nh: int,
    nkv: int,
    d: int,
    dtype: torch.dtype,
    backend: str = "triton",
    rot: int | None = None,
) -> None:
    """rot: the rotated features of each head (partial rotary embeddings); None = all d."""
    width = (nh + 2 * nkv) * d
    qkv0 = leaf(torch.randn(b, t, width), dtype)
    angle = torch.rand(b, t, (rot or d) // 2) * 6.3
    cos, sin = (1.2 * angle.cos()).to(dtype), (1.2 * angle.sin()).to(dtype)  # 1.2: an attention factor
    qkv = qkv0.clone()
    out = rope_qkv_(qkv, cos, sin, nh, nkv, backend)
    assert out is qkv and out.dtype == dtype  # in place, returned
    g = torch.randn(b, t, width).to(dtype)
    out.backward(g.clone())  # the backward rotates its incoming gradient in place: hand it a copy
    qf = fp32_leaf(qkv0)
    ref = rope_reference(qf, cos.float(), sin.float(), nh, nkv)
    ref.backward(g.float())
    assert_close(out, ref, dtype)
    assert_close(qkv0.grad, qf.grad, dtype)
    v = slice((nh + nkv) * d, None)
    assert torch.equal(out[..., v], qkv0[..., v]) and torch.equal(qkv0.grad[..., v], g[..., v])  # v untouched
    if rot is not None:  # the features past rot in every q and k head pass unchanged, forward and backward
        keep = torch.arange((nh + nkv) * d) % d >= rot
        assert torch.equal(out[..., : (nh + nkv) * d][..., keep], qkv0[..., : (nh + nkv) * d][..., keep])
        assert torch.equal(qkv0.grad[..., : (nh + nkv) * d][..., keep], g[..., : (nh + nkv) * d][..., keep])


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("b,t", [(1, 1), (2, 7), (1, 33)])
@pytest.mark.parametrize("nh,nkv,d", [(4, 4, 16), (4, 1, 10), (6, 2, 6)])
def test_rope_triton(b: int, t: int, nh: int, nkv: int, d: int, dtype: torch.dtype) -> None:
    """MHA and GQA; head_dim 10 and 6 give odd half widths (a masked tile); 2 heads per tile in the interpreter,
    so 5 rotated heads (4 + 1) end on a half-empty tile."""
    check_rope(b, t, nh, nkv, d, dtype)


def test_rope_torch_path_matches_reference() -> None:
    check_rope(2, 7, 4, 2, 16, torch.float32, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("nh,nkv,d,rot", [(4, 2, 16, 12), (6, 2, 10, 6), (3, 3, 8, 2)])
def test_rope_partial_rotary(backend: str, nh: int, nkv: int, d: int, rot: int) -> None:
    """Partial rotary embeddings (Phi-4-mini rotates 3/4 of each head): the first rot features rotate, as in
    transformers' apply_rotary_pos_emb; 6 and 2 give odd half widths (3, 1)."""
    check_rope(2, 7, nh, nkv, d, torch.float32, backend=backend, rot=rot)


def _longrope_raw(d: int) -> dict:
    g = torch.Generator().manual_seed(0)
    half = d // 2
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": (1 + torch.rand(half, generator=g)).tolist(),
        "long_factor": (1 + 4 * torch.rand(half, generator=g)).tolist(),
    }
    return {"model_type": "phi3", "hidden_size": 4 * d, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 256,
            "original_max_position_embeddings": 32, "rope_parameters": rope}  # fmt: skip


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("start", [0, 40])  # positions 0..16 (short factors) and 40..56 (> 32: long factors)
def test_rope_longrope_matches_transformers(start: int, dtype: torch.dtype) -> None:
    """phi3fast's RotaryEmbedding + rope_qkv_ (Triton) on a GQA LongRoPE config equals transformers' own
    Phi3RotaryEmbedding + apply_rotary_pos_emb, for q and k."""
    from transformers import Phi3Config as HFConfig
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

    d, nh, nkv, b, t = 16, 4, 2, 2, 17
    raw = _longrope_raw(d)
    cfg = config_from_dict(raw)
    assert cfg.rope_scaling is not None and cfg.rope_attention_factor > 1.0
    pos = torch.arange(start, start + t).expand(b, t)
    cos, sin = RotaryEmbedding(cfg)(pos, dtype)
    qkv = torch.randn(b, t, (nh + 2 * nkv) * d).to(dtype)
    q = qkv[..., : nh * d].float().view(b, t, nh, d).transpose(1, 2)
    k = qkv[..., nh * d : (nh + nkv) * d].float().view(b, t, nkv, d).transpose(1, 2)
    hf_cos, hf_sin = Phi3RotaryEmbedding(HFConfig(**raw))(q, pos)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    out = rope_qkv_(qkv, cos, sin, nh, nkv, "triton")
    assert_close(out[..., : nh * d].view(b, t, nh, d).transpose(1, 2), q_ref, dtype)
    assert_close(out[..., nh * d : (nh + nkv) * d].view(b, t, nkv, d).transpose(1, 2), k_ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("nh,nkv,d", [(32, 32, 96), (40, 10, 128)])  # Phi-3-mini, Phi-3-medium
def test_rope_bf16_cuda(nh: int, nkv: int, d: int) -> None:
    torch.set_default_device("cuda")
    try:
        check_rope(2, 33, nh, nkv, d, torch.bfloat16)
    finally:
        torch.set_default_device("cpu")


# ---- SwiGLU ------------------------------------------------------------------------------------------------------


def check_swiglu(shape: tuple[int, ...], dtype: torch.dtype, backend: str = "triton") -> None:
    gu = leaf(torch.randn(shape) * 3, dtype)
    out = swiglu(gu, backend)
    g = torch.randn(out.shape).to(dtype)
    out.backward(g)
    gf = fp32_leaf(gu)
    ref = swiglu_reference(gf)
    ref.backward(g.float())
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_close(gu.grad, gf.grad, dtype)


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("inter", [17, 130])
def test_swiglu_triton(rows: int, inter: int, dtype: torch.dtype) -> None:
    check_swiglu((rows, 2 * inter), dtype)


def test_swiglu_leading_dims_noncontiguous() -> None:
    """A [B, T, 2I] view with a row stride wider than 2I (a slice of a bigger buffer)."""
    base = torch.randn(3, 5, 80)
    gu = base[..., :34].requires_grad_()
    out = swiglu(gu, "triton")
    out.sum().backward()
    gf = fp32_leaf(gu)
    swiglu_reference(gf).sum().backward()
    assert_close(out, swiglu_reference(gf), torch.float32)
    assert_close(gu.grad, gf.grad, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("inter", [8192, 17920])
def test_swiglu_bf16_cuda(inter: int) -> None:
    torch.set_default_device("cuda")
    try:
        check_swiglu((17, 2 * inter), torch.bfloat16)
    finally:
        torch.set_default_device("cpu")


# ---- auto / torch paths and bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_on_cpu_is_torch(dtype: torch.dtype) -> None:
    """backend='auto' on CPU runs the torch reference: bit-identical outputs and gradients."""
    x0, w0 = torch.randn(7, 130).to(dtype), torch.randn(130).to(dtype)
    qkv0, cs = torch.randn(2, 7, 8 * 16).to(dtype), torch.randn(2, 2, 7, 8).to(dtype)
    gu0 = torch.randn(7, 34).to(dtype)
    results = []
    for backend in ("auto", "torch"):
        x, w, qkv_leaf, gu = (t.clone().requires_grad_() for t in (x0, w0, qkv0, gu0))
        outs = [
            rms_norm(x, w, EPS, backend),
            rope_qkv_(qkv_leaf.clone(), cs[0], cs[1], 4, 2, backend),
            swiglu(gu, backend),
        ]
        sum(o.float().square().sum() for o in outs).backward()
        results.append([*outs, x.grad, w.grad, qkv_leaf.grad, gu.grad])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_bad_inputs_name_the_argument() -> None:
    x, qkv, cs = torch.randn(3, 16), torch.randn(1, 3, 8 * 16), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="weight of shape"):
        rms_norm(x, torch.ones(15), EPS)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(16), 0.0)
    with pytest.raises(ValueError, match="x must be a floating-point"):
        rms_norm(x.long(), torch.ones(16), EPS)
    with pytest.raises(ValueError, match="head_dim 5 must be even"):
        rope_qkv_(torch.randn(1, 3, 6 * 5), torch.randn(1, 3, 2), torch.randn(1, 3, 2), 4, 1)
    with pytest.raises(ValueError, match="n_heads \\+ 2 \\* n_kv_heads"):
        rope_qkv_(qkv, cs, cs, 3, 1)
    with pytest.raises(ValueError, match="sin of shape"):
        rope_qkv_(qkv, cs, torch.randn(1, 4, 8), 4, 2)
    with pytest.raises(ValueError, match="n_kv_heads=0"):
        rope_qkv_(qkv, cs, cs, 8, 0)
    with pytest.raises(ValueError, match="gate_up of shape"):
        swiglu(torch.randn(3, 17))
    with pytest.raises(KernelInputError, match="backend='cuda'"):
        swiglu(torch.randn(3, 16), "cuda")
    with pytest.raises(KernelInputError, match="interpreter"):  # bf16 cannot run on the interpreter
        swiglu(torch.randn(3, 16).bfloat16(), "triton")


# ---- what autograd keeps -----------------------------------------------------------------------------------------


def saved_by(fn) -> list[torch.Tensor]:
    """The tensors autograd saves for backward while fn() runs."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_saved_tensors() -> None:
    """RMSNorm keeps x, weight and one fp32 inverse RMS per row; SwiGLU keeps only gate_up; RoPE keeps only cos
    and sin (nothing of qkv). The torch path of RMSNorm keeps fp32 copies of x (what the kernel avoids)."""
    x, w = torch.randn(7, 130, requires_grad=True), torch.randn(130, requires_grad=True)
    kept = saved_by(lambda: rms_norm(x, w, EPS, "triton"))
    assert [tuple(t.shape) for t in kept] == [(7, 130), (130,), (7,)] and kept[2].dtype == torch.float32
    assert kept[0].data_ptr() == x.data_ptr() and kept[1].data_ptr() == w.data_ptr()
    torch_kept = saved_by(lambda: rms_norm(x, w, EPS, "torch"))
    assert sum(t.numel() for t in torch_kept) > 2 * x.numel()
    gu = torch.randn(7, 34, requires_grad=True)
    kept = saved_by(lambda: swiglu(gu, "triton"))
    assert len(kept) == 1 and kept[0].data_ptr() == gu.data_ptr() and kept[0].shape == gu.shape
    qkv, cs = torch.randn(2, 3, 8 * 16, requires_grad=True), torch.randn(2, 3, 8)
    kept = saved_by(lambda: rope_qkv_(qkv.clone(), cs, cs, 4, 2, "triton"))
    assert len(kept) == 2 and all(t.data_ptr() == cs.data_ptr() for t in kept)


# ---- the model switch --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory)


def lora_model(path: Path, backend: str):
    from phi3fast.lora import LoraConfig, apply_lora, lora_parameters

    model = load(path, quantize=None)
    apply_lora(model, LoraConfig(r=4, dropout=0.0))
    torch.manual_seed(0)
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
    model.set_kernel_backend(backend)
    return model, lora_parameters(model)


def logits_and_grads(model, params, ids: torch.Tensor, ckpt: bool) -> list[torch.Tensor]:
    model.gradient_checkpointing = ckpt
    model.zero_grad()
    logits = model(ids)
    logits.float().logsumexp(-1).sum().backward()
    return [logits.detach(), *(p.grad.clone() for p in params)]


def test_model_triton_matches_torch(tiny: Path) -> None:
    """Logits and LoRA grads of a tiny Phi-3 with the Triton row-wise kernels (interpreter) equal the torch path;
    under gradient checkpointing the in-place RoPE is recomputed on a fresh qkv and gives the same grads."""
    ids = torch.randint(0, VOCAB, (2, 5))
    model, params = lora_model(tiny, "torch")
    want = logits_and_grads(model, params, ids, ckpt=False)
    model.set_kernel_backend("triton")
    assert model.kernel_backend == "triton" and model.layers[0].mlp.kernel_backend == "triton"
    for ckpt in (False, True):
        got = logits_and_grads(model, params, ids, ckpt)
        for a, b in zip(got, want, strict=True):
            assert_close(a, b, torch.float32)
    with pytest.raises(Phi3FastError, match="kernel backend 'cuda'"):
        model.set_kernel_backend("cuda")


def test_model_triton_kv_cache(tiny: Path) -> None:
    """Generation path: RoPE in place on qkv before the cache update, positions past..past+T."""
    model = load(tiny, quantize=None)
    model.kernel_backend = "triton"
    ids = torch.randint(0, VOCAB, (1, 6))
    cache = model.new_kv_cache(1, 6)
    with torch.no_grad():
        full = model(ids)
        steps = [
            model(ids[:, :4], kv_cache=cache),
            model(ids[:, 4:5], kv_cache=cache),
            model(ids[:, 5:], kv_cache=cache),
        ]
        model.kernel_backend = "torch"
        ref = model(ids)
    assert_close(torch.cat(steps, dim=1), full, torch.float32)
    assert_close(full, ref, torch.float32)


# ---- AOT ---------------------------------------------------------------------------------------------------------

# The register-heaviest launches at Phi-3 sizes (`python -m phi3fast.kernels.report` compiles every config).
AOT_MATCH = r"rms_norm_bwd bf16,dw=1,BLOCK_H=8192|rope_qkv bf16,inverse=1"


@pytest.mark.slow
def test_aot_heaviest_rowwise_configs_do_not_spill() -> None:
    rows = compile_report(AOT_MATCH)  # checks every row: compiled, no spills
    assert {(r["kernel"], r["arch"]) for r in rows} == {
        (k, a) for k in ("rms_norm_bwd", "rope_qkv") for a in ("sm_80", "sm_90")
    }
    assert len(rows) == 4
