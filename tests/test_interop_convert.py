"""`phi3fast convert`: tiny random Llama checkpoints (safetensors and GGUF) → Phi-3 layout, logits as the source's.

The oracles are transformers' own classes: LlamaForCausalLM on the source (for a GGUF, loaded by transformers'
GGUF reader), Phi3ForCausalLM on the converted directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interop_helpers import CHATML, make_llama, write_llama_gguf

from phi3fast.errors import Phi3FastError
from phi3fast.interop.convert import convert
from phi3fast.interop.gguf_read import permute_rope, unpermute_rope

pytest.importorskip("gguf")

# Fused qkv / gate_up matmuls sum the same products as the separate ones; only BLAS blocking may differ.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def _ids(vocab: int, n: int = 23, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out).float()


def _hf(path: Path, **kw):  # noqa: ANN003, ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_convert_safetensors_logits_equal_llama(tmp_path: Path, tie: bool) -> None:
    src = make_llama(tmp_path / "llama", tie=tie)
    out = convert(src, tmp_path / "phi3")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and cfg["phi3fast_source_architecture"] == "llama"
    assert cfg["tie_word_embeddings"] is tie and cfg["num_key_value_heads"] == 2
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir())
    phi3 = _hf(out)
    assert type(phi3).__name__ == "Phi3ForCausalLM"
    ids = _ids(512)
    torch.testing.assert_close(_logits(phi3, ids), _logits(_hf(src), ids), **FP32_TOL)


def test_convert_keeps_tokenizer_template_eos(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    src = make_llama(tmp_path / "llama")
    out = convert(src, tmp_path / "phi3")
    a, b = AutoTokenizer.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "Hello there"}]
    assert b.chat_template == CHATML
    assert b.apply_chat_template(msgs, add_generation_prompt=True) == a.apply_chat_template(
        msgs, add_generation_prompt=True
    )
    src_cfg = json.loads((src / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == src_cfg["eos_token_id"]
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == src_cfg["eos_token_id"]


def test_convert_loads_in_phi3fast(tmp_path: Path) -> None:
    from phi3fast.model import load

    src = make_llama(tmp_path / "llama")
    out = convert(src, tmp_path / "phi3")
    ids = _ids(512)
    ours = load(out, quantize=None, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(_logits(ours, ids), _logits(_hf(src), ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_convert_dtype(tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    from safetensors.torch import load_file

    out = convert(make_llama(tmp_path / "llama"), tmp_path / "phi3", dtype=dtype)
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch_dtype}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(torch_dtype)[6:]


def test_rope_permutation_round_trip() -> None:
    w = torch.randn(3 * 10, 7)
    assert torch.equal(unpermute_rope(permute_rope(w, 3), 3), w)
    assert not torch.equal(permute_rope(w, 3), w)


@pytest.mark.parametrize("tie", [False, True])
def test_convert_gguf_logits_equal_transformers_gguf(tmp_path: Path, tie: bool) -> None:
    src = make_llama(tmp_path / "llama", tie=tie, heads=4, kv_heads=2)
    # Untied: one Q8_0 matrix (the block codec path); tied: all F32, so the source itself is an oracle too.
    q8 = () if tie else ("blk.1.ffn_down.weight",)
    gguf_file = write_llama_gguf(src, tmp_path / "tiny.gguf", q8_names=q8)
    out = convert(gguf_file, tmp_path / "phi3")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["phi3fast_source_architecture"] == "llama" and cfg["tie_word_embeddings"] is tie
    ids = _ids(512)
    oracle = _hf(tmp_path, gguf_file="tiny.gguf")
    torch.testing.assert_close(_logits(_hf(out), ids), _logits(oracle, ids), **FP32_TOL)
    if not q8:
        torch.testing.assert_close(_logits(_hf(out), ids), _logits(_hf(src), ids), **FP32_TOL)


def test_convert_gguf_tokenizer_and_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    src = make_llama(tmp_path / "llama")
    out = convert(write_llama_gguf(src, tmp_path / "tiny.gguf"), tmp_path / "phi3")
    a, b = AutoTokenizer.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(out))
    text = "The loader reads <|im_end|> tokens and\nnew lines."
    assert b(text).input_ids == a(text).input_ids
    msgs = [{"role": "user", "content": "Hi"}]
    assert b.apply_chat_template(msgs, tokenize=False) == a.apply_chat_template(msgs, tokenize=False)
    src_cfg = json.loads((src / "config.json").read_text())
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == src_cfg["eos_token_id"][0]


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"attention_bias": True}, "biases in q/k/v"),
        ({"mlp_bias": True}, "MLP biases"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
    ],
)
def test_convert_refuses_unmappable_llama(tmp_path: Path, extra: dict, match: str) -> None:
    src = make_llama(tmp_path / "llama", **extra)
    with pytest.raises(Phi3FastError, match=match):
        convert(src, tmp_path / "phi3")
    assert not (tmp_path / "phi3").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["llama"]  # no temp dir left


def test_convert_refuses_moe_and_other_archs(tmp_path: Path) -> None:
    src = make_llama(tmp_path / "llama")
    cfg = json.loads((src / "config.json").read_text())
    mixtral = {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}
    for change, match in ((mixtral, "mixture-of-experts"), ({"model_type": "gpt2"}, "does not map to Phi-3")):
        (src / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(Phi3FastError, match=match):
            convert(src, tmp_path / "phi3")


def test_convert_refuses_bias_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = make_llama(tmp_path / "llama")
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Phi3FastError, match=r"q_proj.bias' is a bias"):
        convert(src, tmp_path / "phi3")


def test_convert_bad_inputs(tmp_path: Path) -> None:
    src = make_llama(tmp_path / "llama")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(Phi3FastError, match="not an empty directory"):
        convert(src, tmp_path / "busy")
    with pytest.raises(Phi3FastError, match="dtype must be one of"):
        convert(src, tmp_path / "o", dtype="int8")
    with pytest.raises(Phi3FastError, match="no such GGUF file"):
        convert(tmp_path / "missing.gguf", tmp_path / "o")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00garbage")
    with pytest.raises(Phi3FastError, match="not a readable GGUF file"):
        convert(tmp_path / "bad.gguf", tmp_path / "o")


def test_cli_convert_error_is_one_line(tmp_path: Path) -> None:
    src = make_llama(tmp_path / "llama", attention_bias=True)
    r = subprocess.run(
        [sys.executable, "-m", "phi3fast", "convert", str(src), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "biases" in r.stderr


def test_missing_gguf_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(Phi3FastError, match=r"pip install 'phi3fast\[gguf\]'"):
        convert(tmp_path / "x.gguf", tmp_path / "o")


def test_convert_hub_id_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id resolves through huggingface_hub's cache (offline here): the same conversion as the directory."""
    import shutil

    src = make_llama(tmp_path / "llama")
    repo = tmp_path / "cache" / "models--acme--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = convert("acme/tiny-llama", tmp_path / "phi3")
    ids = _ids(512)
    torch.testing.assert_close(_logits(_hf(out), ids), _logits(_hf(src), ids), **FP32_TOL)
