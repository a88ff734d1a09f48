"""merge: dequant(NF4 base) + LoRA delta written as a transformers checkpoint that matches base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from model_helpers import REL_TOL, VOCAB, make_tiny, rel_err
from safetensors.torch import load_file

import phi3fast.lora.merge as merge_mod
from phi3fast.cli import main
from phi3fast.errors import Phi3FastError
from phi3fast.lora import LoraConfig, apply_lora, lora_parameters, save_adapter
from phi3fast.lora.merge import merge_adapter
from phi3fast.model import load
from phi3fast.quant import quantize_nf4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def adapter(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = load(tiny)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=("qkv_proj", "gate_up_proj", "down_proj")))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return save_adapter(model, tmp_path_factory.mktemp("ad") / "adapter")


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()(ids).logits


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_merged_checkpoint_matches_base_plus_adapter(
    tiny: Path, adapter: Path, tmp_path: Path, quantize
) -> None:
    out = merge_adapter(tiny, adapter, tmp_path / "merged", quantize=quantize)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(tmp_path.glob(".merged.*"))  # the temp dir was renamed, not left behind
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        expected = load(tiny, adapter=adapter, quantize=quantize)(ids)
        base = load(tiny, quantize=quantize)(ids)
    merged = hf_logits(out, ids)
    assert rel_err(merged, expected) < REL_TOL[torch.float32]
    assert rel_err(base, expected) > 10 * REL_TOL[torch.float32]  # the adapter changes the logits


def test_nf4_merge_uses_the_quantized_base(tiny: Path, adapter: Path, tmp_path: Path) -> None:
    """QLoRA trained against dequant(NF4(W)); the merge must use that, not the original 16-bit W."""
    out = merge_adapter(tiny, adapter, tmp_path / "merged")
    key = "model.layers.0.mlp.gate_up_proj.weight"
    w = load_file(str(tiny / "model.safetensors"))[key]
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.mlp.gate_up_proj"
    delta = (8 / 4) * ad[f"{prefix}.lora_B.weight"] @ ad[f"{prefix}.lora_A.weight"]
    got = load_file(str(out / "model.safetensors"))[key]
    torch.testing.assert_close(got, quantize_nf4(w).dequantize() + delta, rtol=0, atol=1e-6)
    assert (got - (w + delta)).abs().max() > 1e-3
    untouched = "model.layers.0.self_attn.o_proj.weight"  # not a LoRA target: dequant(NF4) as trained
    torch.testing.assert_close(load_file(str(out / "model.safetensors"))[untouched], quantize_nf4(load_file(str(tiny / "model.safetensors"))[untouched]).dequantize())  # fmt: skip


def test_sharded_output(tiny: Path, adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merge_mod, "MAX_SHARD_BYTES", 60_000)
    out = merge_adapter(tiny, adapter, tmp_path / "sharded", quantize=None, dtype=torch.bfloat16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        ours = load(out, quantize=None, dtype=torch.float32)(ids)
    assert rel_err(hf_logits(out, ids), ours) < REL_TOL[torch.float32]


def test_errors_and_cli(tiny: Path, adapter: Path, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(Phi3FastError, match="already exists"):
        merge_adapter(tiny, adapter, tmp_path / "full")
    with pytest.raises(Phi3FastError, match="adapter_config.json: missing"):
        merge_adapter(tiny, tmp_path / "full", tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    result = CliRunner().invoke(
        main, ["merge", "--model", str(tiny), "--adapter", str(adapter), "--out", str(tmp_path / "cli")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    result = CliRunner().invoke(
        main, ["merge", "--model", str(tiny), "--adapter", str(adapter), "--out", str(tmp_path / "cli")]
    )
    assert result.exit_code == 2 and "already exists" in result.output


def test_merge_over_a_bnb_4bit_checkpoint(tiny: Path, tmp_path: Path) -> None:
    """A base saved by transformers + bitsandbytes (4-bit) merges from its stored NF4 data."""
    import shutil

    from model_helpers import hf_bnb_model

    hf_bnb_model(tiny).save_pretrained(str(tmp_path / "bnb"))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny / f, tmp_path / "bnb" / f)
    model = load(tmp_path / "bnb")
    apply_lora(model, LoraConfig(r=2))
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.2)
    save_adapter(model, tmp_path / "ad")
    out = merge_adapter(tmp_path / "bnb", tmp_path / "ad", tmp_path / "merged")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        expected = load(tmp_path / "bnb", adapter=tmp_path / "ad")(ids)
    assert rel_err(hf_logits(out, ids), expected) < REL_TOL[torch.float32]
