"""LoRA adapters: PEFT-format round trip both ways (peft is the oracle), trainable set, state dicts, bad adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from model_helpers import REL_TOL, VOCAB, hf_bnb_model, make_tiny, rel_err
from safetensors.torch import load_file, save_file

from phi3fast.errors import Phi3FastError
from phi3fast.lora import (
    LoraConfig,
    apply_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    save_adapter,
)
from phi3fast.model import load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory)


def trained_adapter(base: Path, out: Path, quantize: str | None, cfg: LoraConfig) -> Path:
    """An adapter with nonzero B (a fresh one is a no-op, and a parity test over it could not fail)."""
    model = load(base, quantize=quantize)
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return save_adapter(model, out)


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor, bnb: bool = False) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if bnb:
        hf = hf_bnb_model(base)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(adapter)).eval()
    with torch.no_grad():
        return peft_model(ids).logits


@pytest.mark.parametrize(
    "quantize, targets",
    [(None, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")), ("nf4", ("qkv_proj", "down_proj"))],
    ids=["dense-all", "nf4-subset"],
)
def test_our_adapter_loads_in_peft(tiny: Path, tmp_path: Path, quantize: str | None, targets: tuple) -> None:
    adapter = trained_adapter(
        tiny, tmp_path / "ad", quantize, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=targets)
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["base_model_name_or_path"] == str(tiny)
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in keys
    ids = torch.randint(0, VOCAB, (2, 17))
    ours = load(tiny, adapter=adapter, quantize=quantize)
    with torch.no_grad():
        a = ours(ids)
        base = load(tiny, quantize=quantize)(ids)
    b = peft_logits(tiny, adapter, ids, bnb=quantize == "nf4")
    assert rel_err(a, b) < REL_TOL[torch.float32]
    assert rel_err(base, b) > 10 * REL_TOL[torch.float32]  # the adapter matters


def test_peft_adapter_loads_here(tiny: Path, tmp_path: Path) -> None:
    """An adapter trained and saved by PEFT itself (rsLoRA scale, 'all-linear') loads with the same logits."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    cfg = PeftLoraConfig(r=8, lora_alpha=4, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], use_rslora=True, task_type="CAUSAL_LM")  # fmt: skip
    pm = get_peft_model(hf, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    pm.save_pretrained(str(tmp_path / "peft"))
    ids = torch.randint(0, VOCAB, (2, 11))
    pm.eval()
    with torch.no_grad():
        b = pm(ids).logits
        a = load(tiny, adapter=tmp_path / "peft", quantize=None)(ids)
    assert rel_err(a, b) < REL_TOL[torch.float32]


def test_only_lora_is_trainable_and_gets_grads(tiny: Path) -> None:
    model = load(tiny)
    apply_lora(model, LoraConfig(r=2, dropout=0.0))
    params = lora_parameters(model)
    assert len(params) == 2 * 4 * 2  # A and B, 4 targets, 2 layers
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    assert all(p.dtype == torch.float32 for p in params)
    model(torch.randint(0, VOCAB, (1, 5))).sum().backward()
    assert all(p.grad is not None for p in params)
    assert model.embed_tokens.weight.grad is None and model.lm_head.weight.grad is None
    with pytest.raises(Phi3FastError, match="already has LoRA"):
        apply_lora(model, LoraConfig())


def test_lora_dropout_only_in_training(tiny: Path) -> None:
    model = load(tiny, quantize=None)
    apply_lora(model, LoraConfig(r=4, dropout=0.5))
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.2)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        ev1, ev2 = model(ids), model(ids)
        model.train()
        tr = model(ids)
    assert torch.equal(ev1, ev2) and rel_err(tr, ev1) > 1e-3


def test_state_dict_round_trip(tiny: Path) -> None:
    src = load(tiny, quantize=None)
    apply_lora(src, LoraConfig(r=4))
    for p in lora_parameters(src):
        torch.nn.init.normal_(p)
    dst = load(tiny, quantize=None)
    apply_lora(dst, LoraConfig(r=4))
    load_lora_state_dict(dst, lora_state_dict(src))
    for a, b in zip(lora_parameters(src), lora_parameters(dst), strict=True):
        assert torch.equal(a, b)
    other = load(tiny, quantize=None)
    apply_lora(other, LoraConfig(r=8))
    with pytest.raises(Phi3FastError, match="has shape"):
        load_lora_state_dict(other, lora_state_dict(src))


def test_config_validation() -> None:
    with pytest.raises(Phi3FastError, match="target modules"):
        LoraConfig(target_modules=("lm_head",))
    with pytest.raises(Phi3FastError, match="rank"):
        LoraConfig(r=0)
    with pytest.raises(Phi3FastError, match="dropout"):
        LoraConfig(dropout=1.0)


def _edit_config(d: Path, **kw: object) -> None:
    raw = json.loads((d / "adapter_config.json").read_text())
    raw.update(kw)
    (d / "adapter_config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "adapter_config.json").unlink(), r"adapter_config.json: missing"),
        (lambda d: (d / "adapter_config.json").write_text("{"), r"adapter_config.json: not a valid JSON"),
        (lambda d: _edit_config(d, peft_type="IA3"), r"adapter_config.json: peft_type 'IA3'"),
        (lambda d: _edit_config(d, use_dora=True), r"unsupported LoRA options \['use_dora'\]"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), r"adapter_model.safetensors: missing"),
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(b"junk" * 9),
            r"adapter_model.safetensors: not a valid",
        ),
        (
            lambda d: _edit_config(d, target_modules=["qkv_proj"]),
            r"adapter_model.safetensors: LoRA tensors do not match",
        ),
        (lambda d: _edit_config(d, r=3), r"adapter_model.safetensors: .* has shape"),
    ],
    ids=["no-config", "bad-json", "not-lora", "dora", "no-weights", "garbled", "wrong-targets", "wrong-rank"],
)
def test_bad_adapter_errors(tiny: Path, tmp_path: Path, damage, message: str) -> None:
    src = tmp_path / "src"
    trained_adapter(tiny, src, None, LoraConfig(r=2))
    bad = shutil.copytree(src, tmp_path / "bad")
    damage(bad)
    with pytest.raises(Phi3FastError, match=message):
        load(tiny, adapter=bad, quantize=None)


def test_adapter_for_another_model_is_rejected(tiny: Path, tmp_path: Path) -> None:
    adapter = trained_adapter(tiny, tmp_path / "ad", None, LoraConfig(r=2))
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"
    sd[key] = torch.zeros(2, 32)
    save_file(sd, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(Phi3FastError, match=r"o_proj.lora_A.weight' has shape \(2, 32\)"):
        load(tiny, adapter=adapter, quantize=None)
