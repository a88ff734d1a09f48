"""The real model: SmolLM2-135M-Instruct converted to Phi-3 layout (as `make demo` caches it).

Skipped when neither PHI3FAST_REAL_MODEL nor the demo's cache holds it (`make demo` makes it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CANDIDATES = [
    os.environ.get("PHI3FAST_REAL_MODEL", ""),
    str(Path.home() / ".cache/phi3fast/smollm2-135m-instruct-phi3"),
]
REAL = next((Path(p) for p in CANDIDATES if p and (Path(p) / "config.json").is_file()), None)
GGUF = Path.home() / ".cache/phi3fast/SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        REAL is None, reason="no converted SmolLM2 (run `make demo` or set PHI3FAST_REAL_MODEL)"
    ),
]


def test_real_model_answers_in_english() -> None:
    from phi3fast.generate import stream_chat
    from phi3fast.model import load

    model = load(REAL, quantize="nf4", dtype=torch.float32, device="cpu")
    answer = "".join(
        stream_chat(model, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=12)
    )
    assert "Paris" in answer


def test_real_model_logits_equal_transformers_phi3() -> None:
    from transformers import AutoModelForCausalLM

    from phi3fast.model import load

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2, 198, 1, 9690, 198]])
    ours = load(REAL, quantize=None, dtype=torch.float32, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(REAL), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Phi3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not GGUF.is_file(), reason="the demo's SmolLM2 GGUF is not cached")
def test_converted_equals_the_gguf() -> None:
    """The conversion is exact: transformers' Llama from the GGUF and its Phi-3 from our directory agree."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2]])
    src = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    dst = AutoModelForCausalLM.from_pretrained(str(REAL), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(dst(ids).logits, src(ids).logits, rtol=1e-5, atol=1e-5)
