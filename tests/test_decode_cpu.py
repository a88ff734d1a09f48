"""The CPU decode loop with the native kernels: greedy output equals the torch reference path's.

The reference run turns the native kernels off (nf4_cpu.available -> False), so every NF4 projection and the
lm_head go through plain torch (`_tiled_gemm`, F.linear); the native run uses the C++ GEMV/GEMM and the dense
lm_head GEMV on the thread pool. Both sum in fp32, so greedy tokens agree unless two logits tie within fp32
rounding, which the random tiny model does not produce.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import VOCAB, make_tiny
from phi3fast.kernels import nf4_cpu

from phi3fast.generate import generate_tokens
from phi3fast.model import load

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="native module built without the NF4 kernels")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory)


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_greedy_32_tokens_match_the_torch_path(tiny: Path, quantize: str | None, monkeypatch) -> None:
    model = load(tiny, quantize=quantize, device="cpu")
    prompt = torch.randint(0, VOCAB, (11,)).tolist()
    native = list(generate_tokens(model, prompt, max_new_tokens=32, stop=set()))
    with monkeypatch.context() as m:
        m.setattr(nf4_cpu, "available", lambda: False)
        reference = list(generate_tokens(model, prompt, max_new_tokens=32, stop=set()))
    assert len(native) == 32
    assert native == reference


def test_decode_restores_torch_threads(tiny: Path) -> None:
    """The loop runs torch's ops on one thread per step and gives the setting back, even between yields."""
    model = load(tiny, device="cpu")
    before = torch.get_num_threads()
    tokens = generate_tokens(model, [1, 2, 3], max_new_tokens=4, stop=set())
    next(tokens)
    assert torch.get_num_threads() == before
    list(tokens)
    assert torch.get_num_threads() == before
