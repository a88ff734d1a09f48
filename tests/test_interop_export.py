"""`phi3fast export`: GGUF round trips through transformers' own GGUF loader (the oracle).

Two comparisons per type: against the model whose weights are the exported ones after the type's rounding
(`dequantized`: the layout, names, permutations and metadata must be exactly right, fp32 tolerance), and against
the merged fp32 model itself within the type's rounding (the tolerance table below)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interop_helpers import make_llama
from model_helpers import VOCAB, make_tiny, rel_err

from phi3fast.errors import Phi3FastError
from phi3fast.interop import export as export_mod
from phi3fast.interop.convert import convert
from phi3fast.interop.export import export_gguf
from phi3fast.interop.gguf_write import dequantized
from phi3fast.lora import LoraConfig, apply_lora, lora_parameters, save_adapter
from phi3fast.lora.merge import merge_adapter
from phi3fast.model import load

pytest.importorskip("gguf")

GAIN = 3.0
EXACT = dict(rtol=1e-4, atol=1e-4)  # the same weights, summed in another order


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def adapter(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = load(tiny)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=("qkv_proj", "gate_up_proj", "down_proj")))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return save_adapter(model, tmp_path_factory.mktemp("ad") / "adapter")


@pytest.fixture(scope="module")
def merged(tiny: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return merge_adapter(tiny, adapter, tmp_path_factory.mktemp("m") / "merged", dtype=torch.float32)


def _hf(path: Path, **kw):  # noqa: ANN003, ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(ids).logits.float()


def _rounded(path: Path, qtype: str):  # noqa: ANN202
    """The checkpoint at `path` with every matrix replaced by what `qtype` stores of it, and the type's
    tolerance for logits against the unrounded model. The rounding errors of n matrices add in quadrature
    (sqrt(n) times the largest relative weight error); GAIN covers what the tiny random network amplifies
    (measured 2.4x without an adapter, 5.5x with the test's large random adapter)."""
    model = _hf(path)
    errs = []
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                q = dequantized(p.detach(), qtype)
                errs.append(rel_err(q, p))
                p.copy_(q)
    return model, GAIN * len(errs) ** 0.5 * max(errs)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_export_phi3_round_trip(tiny: Path, adapter: Path, merged: Path, tmp_path: Path, qtype: str) -> None:
    out = export_gguf(tiny, tmp_path / "m.gguf", adapter=adapter, qtype=qtype)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file or merged dir left
    gg = _hf(tmp_path, gguf_file=out.name)
    assert type(gg).__name__ == "Phi3ForCausalLM"
    ids = _ids()
    got = _logits(gg, ids)
    rounded, tol = _rounded(merged, qtype)
    torch.testing.assert_close(got, _logits(rounded, ids), **EXACT)
    want = _logits(_hf(merged), ids)
    assert rel_err(got, want) < tol
    if qtype == "f16":  # the adapter is in the export, visibly
        assert rel_err(_logits(_hf(tiny), ids), want) > 10 * rel_err(got, want)


def test_export_tokenizer_and_metadata(tiny: Path, tmp_path: Path) -> None:
    import gguf
    from transformers import AutoTokenizer

    out = export_gguf(tiny, tmp_path / "m.gguf")
    a = AutoTokenizer.from_pretrained(str(tiny))
    b = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = "Resume a run <|user|> with\n  --resume <|end|> now."
    assert b(text).input_ids == a(text).input_ids
    assert b.chat_template == a.chat_template
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.tokens")}
    cfg = json.loads((tiny / "config.json").read_text())
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert f["general.architecture"] == "phi3" and f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.eos_token_id"] == cfg["eos_token_id"]
    assert f["tokenizer.ggml.bos_token_id"] == cfg["bos_token_id"]
    assert f["tokenizer.chat_template"] == a.chat_template
    assert f["phi3.block_count"] == 2 and f["phi3.attention.head_count_kv"] == 4
    assert gen["eos_token_id"][0] == cfg["eos_token_id"]


@pytest.mark.parametrize("qtype", ["f16", "q4_0"])
def test_export_converted_llama_as_llama(tmp_path: Path, qtype: str) -> None:
    """A converted Llama goes out in llama.cpp's llama layout: q/k rows permuted back, q/k/v and gate/up split."""
    import gguf

    src = make_llama(tmp_path / "llama", tie=True, heads=4, kv_heads=2)
    phi3 = convert(src, tmp_path / "phi3")
    (tmp_path / "g").mkdir()
    out = export_gguf(phi3, tmp_path / "g" / "m.gguf", qtype=qtype)
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert "blk.0.attn_q.weight" in names and "blk.0.ffn_gate.weight" in names
    assert "output.weight" not in names  # tied, as llama.cpp expects
    gg = _hf(tmp_path / "g", gguf_file="m.gguf")
    assert type(gg).__name__ == "LlamaForCausalLM"
    ids = _ids(1)
    rounded, tol = _rounded(src, qtype)
    torch.testing.assert_close(_logits(gg, ids), _logits(rounded, ids), **EXACT)
    assert rel_err(_logits(gg, ids), _logits(_hf(src), ids)) < tol


def test_export_then_convert_is_the_model(tiny: Path, tmp_path: Path) -> None:
    """convert reads what export writes: the phi3 GGUF back to a checkpoint with the f16-rounded weights."""
    export_gguf(tiny, tmp_path / "m.gguf")
    back = convert(tmp_path / "m.gguf", tmp_path / "back")
    ids = _ids(2)
    torch.testing.assert_close(_logits(_hf(back), ids), _logits(_rounded(tiny, "f16")[0], ids), **EXACT)


def test_bad_arguments_fail_before_any_work(
    tiny: Path, adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("work started")

    monkeypatch.setattr(export_mod, "write_gguf", boom)
    monkeypatch.setattr("phi3fast.lora.merge.merge_adapter", boom)
    (tmp_path / "file").write_text("x")
    cases = [
        (dict(out_file=tmp_path / "m.gguf", qtype="q5_k"), "type must be one of f16, q8_0, q4_0"),
        (dict(out_file=tmp_path / "nodir" / "m.gguf"), "no such directory"),
        (dict(out_file=tmp_path / "m.bin"), "must end in .gguf"),
        (dict(out_file=tmp_path / "m.gguf", ollama_dir=tmp_path / "file"), "not a directory"),
        (dict(out_file=tmp_path / "m.gguf", adapter=tiny), "not a PEFT adapter"),
    ]
    for kw, match in cases:
        with pytest.raises(Phi3FastError, match=match):
            export_gguf(tiny, **kw)
    with pytest.raises(Phi3FastError, match="no such checkpoint"):
        export_gguf(tmp_path / "missing", tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_failed_write_leaves_nothing(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.gguf").write_bytes(b"old")

    def fail(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod, "write_gguf", fail)
    with pytest.raises(RuntimeError):
        export_gguf(tiny, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert (
        tmp_path / "m.gguf"
    ).read_bytes() == b"old"  # the old file is untouched until the new one is whole


def test_cli_export_and_modelfile(tiny: Path, adapter: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "phi3fast", "export", "--model", str(tiny), "--adapter", str(adapter),
         "--out", str(tmp_path / "m.gguf"), "--type", "q8_0", "--ollama", str(tmp_path / "ollama")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ../m.gguf"
    assert [ln for ln in lines if ln.startswith("PARAMETER")] == [
        "PARAMETER stop <|end|>",
        "PARAMETER stop <|endoftext|>",
        "PARAMETER stop <|assistant|>",
    ]
    assert 'TEMPLATE """' in text and "{{ .Content }}" in text
    bad = subprocess.run(
        [sys.executable, "-m", "phi3fast", "export", "--model", str(tiny), "--out", str(tmp_path / "x" / "m.gguf")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
