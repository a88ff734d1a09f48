"""Shared by the model-area tests (test_model, test_lora_peft, test_generate, test_merge): one tolerance table,
the tiny checkpoint they all use, and the transformers / bitsandbytes oracles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from phi3fast.model.tiny import init_tiny

# The one tolerance table: relative error of logits ||a - b|| / ||b|| (the brief's parity target, fp32).
REL_TOL = {torch.float32: 1e-3}
VOCAB = 512


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_tiny(factory: pytest.TempPathFactory) -> Path:
    """hidden 64, 2 layers, 4 heads, vocab 512: small enough for every test, big enough for a real BPE."""
    return init_tiny(
        factory.mktemp("ckpt") / "tiny", hidden=64, layers=2, heads=4, intermediate=128, vocab=VOCAB
    )


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_bnb_model(path: Path):
    """transformers + bitsandbytes 4-bit NF4 (double quant) on CPU, its fp32 path (no silent bf16 kernel)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=q, dtype=torch.float32, device_map="cpu"
    )
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    assert n == 4 * model.config.num_hidden_layers
    return model.eval()
