"""The native decode step (phi3fast.model.native_decode, csrc/nf4/decode_step.h) against the torch path.

Greedy generation through the native step equals the torch reference path's (model_helpers.torch_path: every
row-wise op and linear in plain torch) for 32 tokens on tiny transformers-written checkpoints with GQA, tied
embeddings, a sliding window, LongRoPE across its switch, wider heads, NF4 and dense, and with a LoRA adapter.
Both paths sum in fp32 in different orders; greedy tokens agree unless two logits tie within that rounding.
Batched steps: each row equals its own single-row run, with rows at different lengths and on different adapters.
Every SIMD level this CPU has gives logits within fp32 rounding of the torch path's full forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import VOCAB, make_tiny, torch_path
from phi3fast.kernels import nf4_cpu
from test_kernels_nf4 import assert_close
from test_model_configs import _checkpoint

from phi3fast._hnsw import supported_simd_levels
from phi3fast.errors import Phi3FastError
from phi3fast.generate import generate_tokens
from phi3fast.lora import LoraConfig, apply_lora
from phi3fast.model import load, native_decode
from phi3fast.model.lm_head import StoredLMHead, store_lm_head
from phi3fast.model.native_decode import NativeDecoder

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="native module built without the NF4 kernels")

CASES = ["tied-embeddings", "sliding-window", "longrope", "head-dim", "odd-sizes-gqa"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tiny = make_tiny(tmp_path_factory)
    root = tmp_path_factory.mktemp("native")
    return {name: _checkpoint(tiny, root / name, name) for name in [*CASES, "partial-rotary"]}


def _greedy(model, prompt: list[int], n: int = 32) -> list[int]:
    return list(generate_tokens(model, prompt, max_new_tokens=n, stop=set()))


def _native_vs_torch(model, prompt: list[int], n: int = 32) -> None:
    assert native_decode.unsupported(model) is None
    native = _greedy(model, prompt, n)
    torch_path(model)
    assert native_decode.unsupported(model) is not None
    assert len(native) == n
    assert native == _greedy(model, prompt, n)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("quantize", ["nf4", None])
def test_greedy_32_tokens_equal_the_torch_path(
    ckpts: dict[str, Path], name: str, quantize: str | None
) -> None:
    if quantize and name == "odd-sizes-gqa":
        pytest.skip("96 and 160 are not NF4 blocks")
    model = load(ckpts[name], quantize=quantize)
    g = torch.Generator().manual_seed(3)
    # LongRoPE: 20 prompt tokens + 32 new ones cross original_max_position_embeddings (24) mid-generation.
    prompt = torch.randint(0, VOCAB, (20 if name == "longrope" else 11,), generator=g).tolist()
    _native_vs_torch(model, prompt)


def _with_lora(path: Path, quantize: str | None):
    model = load(path, quantize=quantize)
    apply_lora(model, LoraConfig(r=4))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B starts at zero: give the adapter a visible effect
        for lin in model.linears().values():
            lin.lora_B.copy_(0.3 * torch.randn(lin.lora_B.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_greedy_with_lora_equals_the_torch_path(ckpts: dict[str, Path], quantize: str | None) -> None:
    model = _with_lora(ckpts["tied-embeddings"], quantize)
    assert NativeDecoder(model, 8).own_adapter == 0
    _native_vs_torch(model, torch.randint(0, VOCAB, (9,)).tolist())


def test_bf16_lm_head_equals_the_torch_path_on_the_same_weights(ckpts: dict[str, Path]) -> None:
    model = load(ckpts["tied-embeddings"], quantize="nf4")
    store_lm_head(model, "bfloat16")
    assert isinstance(model.lm_head, StoredLMHead) and model.lm_head.weight.dtype == torch.bfloat16
    assert model.embed_tokens.weight.dtype == torch.float32  # the embedding keeps its own fp32 table
    _native_vs_torch(model, torch.randint(0, VOCAB, (10,)).tolist())
    with pytest.raises(Phi3FastError, match="lm_head dtype 'int3'"):
        store_lm_head(model, "int3")


def test_partial_rotary_falls_back_to_the_torch_path(ckpts: dict[str, Path]) -> None:
    model = load(ckpts["partial-rotary"], quantize="nf4")
    assert "partial rotary" in native_decode.unsupported(model)
    with pytest.raises(ValueError, match="partial rotary"):
        NativeDecoder(model, 8)
    ref = torch_path(load(ckpts["partial-rotary"], quantize="nf4"))
    prompt = torch.randint(0, VOCAB, (7,)).tolist()
    assert _greedy(model, prompt, 16) == _greedy(ref, prompt, 16)


def _run(dec: NativeDecoder, model, seqs: list[list[int]], adapters: list[int], simd: str | None = None):
    """Feed each row its own token sequence one token per step (rows of different lengths: a row that has
    finished keeps stepping its last token at its own next position); logits of every row at every step."""
    m, steps = len(seqs), max(len(s) for s in seqs)
    cache = model.new_kv_cache(m, steps + 1)
    out = []
    logits = torch.empty((m, model.config.vocab_size))
    ad = torch.tensor(adapters, dtype=torch.int32)
    for t in range(steps):
        tok = torch.tensor([s[min(t, len(s) - 1)] for s in seqs], dtype=torch.int64)
        pos = torch.full((m,), t, dtype=torch.int64)
        dec.step(tok, pos, ad, cache.k, cache.v, logits, simd=simd)
        out.append(logits.clone())
    return torch.stack(out, 1)  # [m, steps, V]


def test_batched_rows_equal_their_single_row_runs(ckpts: dict[str, Path]) -> None:
    model = load(ckpts["tied-embeddings"], quantize="nf4")
    dec = NativeDecoder(model, 64)
    g = torch.Generator().manual_seed(7)
    adapters = []
    for r in (2, 3):
        weights = {}
        for name, lin in model.linears().items():
            a = torch.randn(r, lin.in_features, generator=g) / lin.in_features**0.5
            weights[name] = (a, 0.5 * torch.randn(lin.out_features, r, generator=g), 0.7)
        adapters.append(dec.add_adapter(weights))
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 13, 9)]
    rows = [adapters[0], -1, adapters[1]]
    batched = _run(dec, model, seqs, rows)
    for i, s in enumerate(seqs):
        alone = _run(dec, model, [s], [rows[i]])[0]
        assert torch.equal(batched[i, : len(s)], alone[: len(s)])
    assert not torch.equal(batched[0, :5], _run(dec, model, [seqs[0]], [-1])[0])  # the adapter mattered


@pytest.mark.parametrize("simd", supported_simd_levels())
def test_every_simd_level_matches_the_torch_forward(ckpts: dict[str, Path], simd: str) -> None:
    model = _with_lora(ckpts["sliding-window"], "nf4")
    seq = torch.randint(0, VOCAB, (19,)).tolist()
    native = _run(NativeDecoder(model, 32), model, [seq], [0], simd=simd)[0]
    with torch.inference_mode():
        ref = torch_path(model)(torch.tensor([seq]))[0]
    assert_close(native, ref, torch.float32)


def test_bad_inputs(ckpts: dict[str, Path]) -> None:
    model = load(ckpts["tied-embeddings"], quantize="nf4")
    dec = NativeDecoder(model, 8)
    cache = model.new_kv_cache(1, 8)
    logits = torch.empty((1, VOCAB))
    one = torch.zeros(1, dtype=torch.int64)
    none = torch.full((1,), -1, dtype=torch.int32)

    def step(tok=one, pos=one, ad=none, k=cache.k, v=cache.v, out=logits):
        dec.step(tok, pos, ad, k, v, out)

    with pytest.raises(ValueError, match="out of the vocabulary"):
        step(tok=torch.tensor([VOCAB]))
    with pytest.raises(ValueError, match="position 8 past the KV cache"):
        step(pos=torch.tensor([8]))
    with pytest.raises(ValueError, match="adapter index 0 not registered"):
        step(ad=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="expected contiguous torch.int32"):
        step(ad=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="K/V cache"):
        step(k=cache.k[:1, :, :1])
    with pytest.raises(ValueError, match="more rows than cache slots"):
        step(tok=torch.zeros(2, dtype=torch.int64), pos=torch.zeros(2, dtype=torch.int64),
             ad=torch.full((2,), -1, dtype=torch.int32), out=torch.empty((2, VOCAB)))  # fmt: skip
    with pytest.raises(ValueError, match="logits must be"):
        step(out=torch.empty((1, VOCAB - 1)))
    with pytest.raises(ValueError, match="not supported here|unknown SIMD"):
        dec.step(one, one, none, cache.k, cache.v, logits, simd="avx1024")
    with pytest.raises(ValueError, match="names no projection"):
        dec.add_adapter({"layers.0.self_attn.nope": (torch.zeros(1, 4), torch.zeros(4, 1), 1.0)})
    model.to(torch.bfloat16)
    assert "bfloat16" in native_decode.unsupported(model)
