"""phi3fast.model / loading / config: parity with transformers (dense) and transformers + bitsandbytes (NF4),
LongRoPE, sliding window, GQA, packing, KV cache, gradient checkpointing, and every bad-checkpoint error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from model_helpers import REL_TOL, VOCAB, hf_bnb_model, hf_model, make_tiny, rel_err
from safetensors.torch import load_file, save_file

from phi3fast.errors import Phi3FastError
from phi3fast.model import load
from phi3fast.model.config import REGISTRY, config_from_dict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory)


def edit_checkpoint(src: Path, dst: Path, config: dict | None = None, weights=None) -> Path:
    """Copy a checkpoint, updating config.json keys and transforming its state dict."""
    shutil.copytree(src, dst)
    if config:
        raw = json.loads((dst / "config.json").read_text())
        raw.update(config)
        (dst / "config.json").write_text(json.dumps(raw))
    if weights:
        sd = weights(load_file(str(dst / "model.safetensors")))
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ---- parity ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [1, 17, 130])
def test_dense_matches_transformers(tiny: Path, seq: int) -> None:
    ours, ref = load(tiny, quantize=None), hf_model(tiny)
    ids = torch.randint(0, VOCAB, (2, seq))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert a.shape == (2, seq, VOCAB) and a.dtype == torch.float32
    assert torch.equal(a, b), rel_err(a, b)  # fp32 on CPU: the same ops in the same order, so the same bits


def test_nf4_matches_transformers_bitsandbytes(tiny: Path) -> None:
    ours, ref = load(tiny), hf_bnb_model(tiny)
    assert all(lin.nf4 is not None and lin.weight is None for lin in ours.linears().values())
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        a, b, dense = ours(ids), ref(ids).logits, load(tiny, quantize=None)(ids)
    assert torch.equal(a, b), rel_err(a, b)  # the same NF4 bits, dequantized and multiplied in the same order
    assert rel_err(dense, b) > 10 * REL_TOL[torch.float32]  # NF4 really is in the path (the test can fail)


def test_loads_bnb_4bit_checkpoint_without_requantizing(tiny: Path, tmp_path: Path) -> None:
    ref = hf_bnb_model(tiny)
    ref.save_pretrained(str(tmp_path / "bnb"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / f, tmp_path / "bnb" / f)
    ours = load(tmp_path / "bnb")
    saved = load_file(str(tmp_path / "bnb" / "model.safetensors"))
    packed = ours.linears()["layers.1.mlp.down_proj"].nf4.packed
    assert torch.equal(packed.reshape(-1), saved["model.layers.1.mlp.down_proj.weight"].reshape(-1))
    ids = torch.randint(0, VOCAB, (1, 17))
    with torch.no_grad():
        b = ref(ids).logits
        assert torch.equal(ours(ids), b)
        dense = load(tmp_path / "bnb", quantize=None)  # dequantized once into dense weights
        assert torch.equal(dense(ids), b)


def test_longrope_matches_transformers(tiny: Path, tmp_path: Path) -> None:
    """128k-style LongRoPE: short factors up to original_max, long factors (all positions) beyond, attention factor."""
    half = 64 // 4 // 2
    g = torch.Generator().manual_seed(0)
    rope = {
        "type": "longrope",
        "short_factor": (1 + torch.rand(half, generator=g)).tolist(),
        "long_factor": (1 + 4 * torch.rand(half, generator=g)).tolist(),
    }
    path = edit_checkpoint(
        tiny,
        tmp_path / "lr",
        {"rope_scaling": rope, "max_position_embeddings": 256, "original_max_position_embeddings": 32},
    )
    ours, ref = load(path, quantize=None), hf_model(path)
    assert ours.config.rope_scaling is not None and ours.config.rope_attention_factor > 1.0
    for seq in (17, 40):  # below and above original_max_position_embeddings
        ids = torch.randint(0, VOCAB, (1, seq))
        with torch.no_grad():
            a, b = ours(ids), ref(ids).logits
        assert torch.equal(a, b), (seq, rel_err(a, b))


def test_sliding_window_matches_transformers(tiny: Path, tmp_path: Path) -> None:
    path = edit_checkpoint(tiny, tmp_path / "sw", {"sliding_window": 8})
    ours, ref = load(path, quantize=None), hf_model(path)
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
        assert torch.equal(a, b), rel_err(a, b)
        assert rel_err(a, load(tiny, quantize=None)(ids)) > 1e-2  # the window changes the result


def test_gqa_matches_transformers(tiny: Path, tmp_path: Path) -> None:
    """Grouped-query attention as in Phi-3-medium (kv heads < heads): 4 query heads share 2 kv heads."""
    hd = 64 // 4

    def to_gqa(sd: dict) -> dict:
        for k in list(sd):
            if k.endswith("qkv_proj.weight"):
                w = sd[k]
                sd[k] = torch.cat([w[:64], w[64 : 64 + 2 * hd], w[128 : 128 + 2 * hd]]).contiguous()
        return sd

    path = edit_checkpoint(tiny, tmp_path / "gqa", {"num_key_value_heads": 2}, to_gqa)
    ours, ref = load(path, quantize=None), hf_model(path)
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert torch.equal(a, b), rel_err(a, b)


# ---- packing, cache, checkpointing -------------------------------------------------------------------------------


def test_packing_is_block_diagonal(tiny: Path) -> None:
    model = load(tiny, quantize=None)
    a, b = torch.randint(0, VOCAB, (1, 7)), torch.randint(0, VOCAB, (1, 10))
    packed = torch.cat([a, b], dim=1)
    seq_ids = torch.tensor([[0] * 7 + [1] * 10])
    pos = torch.cat([torch.arange(7), torch.arange(10)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=pos, seq_ids=seq_ids)
        assert rel_err(out[:, :7], model(a)) < 1e-5
        assert rel_err(out[:, 7:], model(b)) < 1e-5
        assert rel_err(model(packed, position_ids=pos)[:, 7:], model(b)) > 1e-2  # without seq_ids: leaks


def test_kv_cache_matches_full_forward(tiny: Path) -> None:
    model = load(tiny)
    ids = torch.randint(0, VOCAB, (2, 13))
    cache = model.new_kv_cache(2, 13)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :5], kv_cache=cache)]
        steps += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(5, 13)]
    assert cache.length == 13
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_gradient_checkpointing_same_grads(tiny: Path) -> None:
    from phi3fast.lora import LoraConfig, apply_lora, lora_parameters

    model = load(tiny, quantize=None)
    apply_lora(model, LoraConfig(r=4, dropout=0.0))
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, VOCAB, (2, 9))
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model(ids).float().logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)


# ---- config registry ---------------------------------------------------------------------------------------------


def _raw(variant: str) -> dict:
    v = REGISTRY[variant]
    raw = {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_key_value_heads": v.num_key_value_heads,
        "vocab_size": v.vocab_size,
        "max_position_embeddings": v.max_position_embeddings,
        "original_max_position_embeddings": 4096,
    }
    if v.longrope:
        n = v.hidden_size // v.num_attention_heads // 2
        raw["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * n, "long_factor": [2.0] * n}
    return raw


@pytest.mark.parametrize("variant", list(REGISTRY))
def test_registry_maps_real_configs(variant: str) -> None:
    raw = _raw(variant) | {"_name_or_path": REGISTRY[variant].hub_id}
    cfg = config_from_dict(raw)
    assert cfg.variant == variant
    if REGISTRY[variant].longrope:
        # sqrt(1 + ln(32) / ln(4096)) for 131072 / 4096, as transformers computes it
        assert cfg.rope_attention_factor == pytest.approx(1.1902380714238083)


def test_registry_names_variants_but_does_not_gate() -> None:
    """Other sizes load as 'custom' (the registry names released models, it is not a gate); other
    architectures and malformed RoPE factors are errors."""
    assert config_from_dict(_raw("phi-3-mini-4k") | {"num_hidden_layers": 24}).variant == "custom"
    no_longrope = {k: v for k, v in _raw("phi-3-mini-128k").items() if k != "rope_scaling"}
    assert config_from_dict(no_longrope).variant == "custom"  # 128k sizes without LongRoPE: not that release
    with pytest.raises(Phi3FastError, match="not a Phi-3-architecture checkpoint"):
        config_from_dict({"model_type": "phi3small", "hidden_size": 4096})
    with pytest.raises(Phi3FastError, match="short_factor"):
        bad = _raw("phi-3.5-mini")
        bad["rope_scaling"]["short_factor"] = [1.0]
        config_from_dict(bad)


# ---- bad checkpoints ---------------------------------------------------------------------------------------------


def test_sharded_checkpoint_loads(tiny: Path, tmp_path: Path) -> None:
    dst = shutil.copytree(tiny, tmp_path / "sharded")
    sd = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}  # fmt: skip
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(dst / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert rel_err(load(dst, quantize=None)(ids), load(tiny, quantize=None)(ids)) == 0.0
    (dst / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(Phi3FastError, match=r"model-00002-of-00002.safetensors: missing"):
        load(dst)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").unlink(), r"config.json: missing"),
        (lambda d: (d / "config.json").write_text("{not json"), r"config.json: not valid JSON"),
        (lambda d: (d / "model.safetensors").unlink(), r"model.safetensors: missing"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 10),
            r"model.safetensors: not a valid",
        ),
        (lambda d: _truncate(d / "model.safetensors"), r"model.safetensors: "),
        (lambda d: (d / "tokenizer.json").unlink(), r"no tokenizer files"),
        (
            lambda d: (d / "model.safetensors.index.json").write_text("{"),
            r"index.json: not a valid safetensors index",
        ),
        (
            lambda d: (d / "tokenizer.json").write_text("{garbage"),
            r"cannot load the tokenizer from tokenizer.json",
        ),
    ],
    ids=[
        "no-config",
        "bad-config",
        "no-weights",
        "garbled-weights",
        "truncated-weights",
        "no-tokenizer",
        "bad-index",
        "bad-tokenizer",
    ],
)
def test_bad_checkpoint_errors_name_the_file(tiny: Path, tmp_path: Path, damage, message: str) -> None:
    dst = shutil.copytree(tiny, tmp_path / "bad")
    damage(dst)
    with pytest.raises(Phi3FastError, match=message):
        load(dst)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_missing_and_misshapen_tensors(tiny: Path, tmp_path: Path) -> None:
    def drop(sd: dict) -> dict:
        del sd["model.layers.1.mlp.down_proj.weight"]
        return sd

    def reshape(sd: dict) -> dict:
        sd["model.norm.weight"] = torch.ones(63)
        return sd

    with pytest.raises(
        Phi3FastError, match=r"model.safetensors: missing tensors \['model.layers.1.mlp.down_proj"
    ):
        load(edit_checkpoint(tiny, tmp_path / "a", weights=drop))
    with pytest.raises(Phi3FastError, match=r"'model.norm.weight' has shape \(63,\)"):
        load(edit_checkpoint(tiny, tmp_path / "b", weights=reshape))
    with pytest.raises(Phi3FastError, match="quantize must be"):
        load(tiny, quantize="int8")


def test_nf4_needs_whole_blocks(tiny: Path, tmp_path: Path) -> None:
    def shrink(sd: dict) -> dict:
        for k in list(sd):
            if "gate_up_proj" in k:
                sd[k] = sd[k][:200].contiguous()  # intermediate 100
            elif "down_proj" in k:
                sd[k] = sd[k][:, :100].contiguous()
        return sd

    path = edit_checkpoint(tiny, tmp_path / "odd", {"intermediate_size": 100}, shrink)
    with pytest.raises(
        Phi3FastError, match=r"config.json: projection sizes \[100, 200\] are not multiples of 64"
    ):
        load(path)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert rel_err(load(path, quantize=None)(ids), hf_model(path)(ids).logits) < REL_TOL[torch.float32]


def test_hub_id_offline_without_cache_names_the_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        Phi3FastError, match="microsoft/Phi-3-mini-4k-instruct: not a local directory and no cached"
    ):
        load("microsoft/Phi-3-mini-4k-instruct")
    with pytest.raises(Phi3FastError, match="no such checkpoint directory"):
        load(tmp_path / "does-not-exist")


def test_hub_id_from_cache(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot in huggingface_hub's cache layout loads by its id, offline."""
    repo = tmp_path / "cache" / "models--microsoft--Phi-3-mini-4k-instruct"
    commit = "0" * 40
    shutil.copytree(tiny, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load("microsoft/Phi-3-mini-4k-instruct", quantize=None)
    assert model.model_dir == repo / "snapshots" / commit
    assert model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"


def test_tolerated_extras_and_defaults(tiny: Path, tmp_path: Path) -> None:
    """RoPE caches of old exports are ignored; a tokenizer without a chat template gets Phi-3's."""
    from phi3fast.model.tiny import PHI3_CHAT_TEMPLATE

    def add_inv_freq(sd: dict) -> dict:
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        return sd

    dst = edit_checkpoint(tiny, tmp_path / "x", weights=add_inv_freq)
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    del tok_cfg["chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    model = load(dst)
    assert model.tokenizer.chat_template == PHI3_CHAT_TEMPLATE

    def add_junk(sd: dict) -> dict:
        sd["model.layers.0.self_attn.q_proj.weight"] = torch.ones(8)
        return sd

    with pytest.raises(
        Phi3FastError, match=r"model.safetensors: unexpected tensors \['model.layers.0.self_attn.q_proj"
    ):
        load(edit_checkpoint(tiny, tmp_path / "y", weights=add_junk))


def test_to_keeps_nf4_weights(tiny: Path) -> None:
    model = load(tiny)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        before = model(ids)
        model.to("cpu").to(torch.float32)
        lin = model.linears()["layers.0.mlp.down_proj"]
        assert lin.nf4 is not None and lin.nf4.packed.dtype == torch.uint8
        assert torch.equal(model(ids), before)


def test_each_linear_is_quantized_as_it_is_read(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peak host memory ~ one tensor: when a linear is quantized, no earlier dense linear weight is still alive."""
    import weakref

    import phi3fast.model.loading as loading
    import phi3fast.quant as quant

    alive: list[weakref.ref] = []
    seen: list[int] = []
    real_get, real_quantize = loading._Reader.get, quant.quantize_nf4

    def get(self, key: str) -> torch.Tensor:
        t = real_get(self, key)
        if key.endswith("_proj.weight"):
            alive.append(weakref.ref(t))
        return t

    def quantize(w: torch.Tensor, *args, **kwargs):
        seen.append(sum(r() is not None for r in alive))
        return real_quantize(w, *args, **kwargs)

    monkeypatch.setattr(loading._Reader, "get", get)
    monkeypatch.setattr(quant, "quantize_nf4", quantize)
    load(tiny)
    assert seen == [1] * 8  # 4 projections x 2 layers, each the only dense projection weight in memory
