"""Any Phi-3-architecture checkpoint loads: each feature transformers' Phi3ForCausalLM accepts, on a tiny random
model that transformers itself writes (save_pretrained), gives transformers' logits; NF4 loading and greedy
generation work on them too.

What is asserted (CPU, fp32): the logits are EQUAL (torch.equal) to transformers' for every configuration here,
dense, and with NF4 to transformers + bitsandbytes (the same NF4 bits); greedy tokens with phi3fast's KV cache
equal the oracle's tokens from full forwards.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from model_helpers import VOCAB, hf_bnb_model, make_tiny, rel_err
from test_kernels_nf4 import assert_close

from phi3fast.cli import main
from phi3fast.errors import Phi3FastError
from phi3fast.generate import generate_tokens, stop_ids
from phi3fast.model import RotaryEmbedding, load
from phi3fast.model.config import CUSTOM, REGISTRY, config_from_dict

# hidden 128 with 4 heads of 32 and 2 kv heads: every projection a multiple of 64, so NF4 applies.
BASE = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
LONGROPE = {"max_position_embeddings": 256, "original_max_position_embeddings": 24}
FEATURES = {
    # odd sizes everywhere (dense only: 96 and 160 are not NF4 blocks), 3 layers, 6 heads over 3 kv heads
    "odd-sizes-gqa": dict(
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
    ),  # fmt: skip
    "mha": dict(num_key_value_heads=4),
    "tied-embeddings": dict(tie_word_embeddings=True),
    "partial-rotary": dict(partial_rotary_factor=0.75),
    "head-dim": dict(head_dim=48),  # heads wider than hidden_size / heads: q is 192 wide over a hidden of 128
    "sliding-window": dict(sliding_window=8),
    "longrope": dict(rope_scaling="longrope", **LONGROPE),
    "eos-list": dict(eos_token_id=[2, 5, 7]),
    # Phi-4-mini's features together: GQA, tied embeddings, 3/4 rotary, LongRoPE, several eos ids
    "phi4-mini-like": dict(
        tie_word_embeddings=True,
        partial_rotary_factor=0.75,
        rope_scaling="longrope",
        eos_token_id=[2, 7],
        **LONGROPE,
    ),  # fmt: skip
}
NF4_ABLE = [name for name in FEATURES if name != "odd-sizes-gqa"]


def _checkpoint(tiny: Path, out: Path, name: str) -> Path:
    """transformers' own Phi3ForCausalLM with these settings, random weights, saved by save_pretrained, plus the
    tiny model's tokenizer."""
    from transformers import Phi3Config, Phi3ForCausalLM

    kw = {**BASE, **FEATURES[name]}
    if kw.pop("rope_scaling", None) == "longrope":
        head_dim = kw["hidden_size"] // kw["num_attention_heads"]
        n = int(head_dim * kw.get("partial_rotary_factor", 1.0)) // 2
        g = torch.Generator().manual_seed(1)
        kw["rope_scaling"] = {"type": "longrope", "short_factor": (1 + torch.rand(n, generator=g)).tolist(),
                              "long_factor": (1 + 4 * torch.rand(n, generator=g)).tolist()}  # fmt: skip
    config = Phi3Config(vocab_size=VOCAB, bos_token_id=1, pad_token_id=0, **{"eos_token_id": 2, **kw})
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    with (
        torch.no_grad()
    ):  # weights of order 1/sqrt(fan_in), norms not all ones: every feature visibly matters
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.0 if "embed" in pname else p.shape[1] ** -0.5)
    model.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny / f, out / f)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tiny = make_tiny(tmp_path_factory)
    root = tmp_path_factory.mktemp("configs")
    return {name: _checkpoint(tiny, root / name, name) for name in FEATURES}


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(FEATURES))
def test_dense_logits_equal_transformers(checkpoints: dict[str, Path], name: str) -> None:
    path = checkpoints[name]
    ours, ref = load(path, quantize=None), _hf(path)
    assert ours.config.variant == CUSTOM
    seqs = (1, 17, 40) if "rope_scaling" in json.loads((path / "config.json").read_text()) else (1, 17)
    for seq in seqs:  # 40: past the LongRoPE original context (24), where the long factors take over
        ids = torch.randint(0, VOCAB, (2, seq))
        with torch.no_grad():
            a, b = ours(ids), ref(ids).logits
        assert a.shape == b.shape == (2, seq, VOCAB)
        assert torch.equal(a, b), (name, seq, rel_err(a, b))


def test_the_features_are_really_there(checkpoints: dict[str, Path]) -> None:
    """Each setting changes the result (so the parity above could fail), and is read as configured."""
    cfg = {name: load(path, quantize=None).config for name, path in checkpoints.items()}
    assert cfg["partial-rotary"].rotary_dim == 24 and cfg["mha"].rotary_dim == 32
    assert cfg["head-dim"].head_dim == 48 and cfg["head-dim"].rotary_dim == 48
    assert cfg["tied-embeddings"].tie_word_embeddings and cfg["sliding-window"].sliding_window == 8
    assert cfg["eos-list"].eos_token_id == (2, 5, 7) and cfg["longrope"].rope_scaling is not None
    ids = torch.randint(0, VOCAB, (1, 17))
    ours = load(checkpoints["partial-rotary"], quantize=None)
    with torch.no_grad():
        partial = ours(ids)
        for name in ("sliding-window", "partial-rotary"):
            model = load(checkpoints[name], quantize=None)
            assert model.embed_tokens.weight.data_ptr() != model.lm_head.weight.data_ptr()
        tied = load(checkpoints["tied-embeddings"], quantize=None)
        assert tied.lm_head.weight is tied.embed_tokens.weight
        ours.rotary = RotaryEmbedding(replace(ours.config, partial_rotary_factor=1.0))  # rotate whole heads
        assert rel_err(ours(ids), partial) > 1e-3


@pytest.mark.parametrize("name", NF4_ABLE)
def test_nf4_loads_and_matches_bitsandbytes(checkpoints: dict[str, Path], name: str) -> None:
    path = checkpoints[name]
    ours, ref = load(path), hf_bnb_model(path)
    assert all(lin.nf4 is not None for lin in ours.linears().values())
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert torch.equal(a, b), rel_err(a, b)


def _greedy_oracle(model, prompt: list[int], n: int, n_real: int) -> list[int]:
    """Greedy tokens by full forwards of the oracle (no cache), ids past the tokenizer masked as phi3fast does."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        logits[n_real:] = float("-inf")
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "name, quantize",
    [("phi4-mini-like", None), ("phi4-mini-like", "nf4"), ("sliding-window", None), ("sliding-window", "nf4"),
     ("odd-sizes-gqa", None)],  # odd sizes are not whole NF4 blocks: dense only
)  # fmt: skip
def test_greedy_generation(checkpoints: dict[str, Path], name: str, quantize: str | None) -> None:
    path = checkpoints[name]
    ours = load(path, quantize=quantize)
    ref = _hf(path) if quantize is None else hf_bnb_model(path)
    prompt = torch.randint(
        3, 300, (30,)
    ).tolist()  # 30 + 12 tokens: past the LongRoPE switch at 24 and the window
    got = list(generate_tokens(ours, prompt, max_new_tokens=12, stop=()))
    assert got == _greedy_oracle(ref, prompt, 12, len(ours.tokenizer))


def test_tied_checkpoint_that_stores_lm_head_too(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = shutil.copytree(checkpoints["tied-embeddings"], tmp_path / "tied")
    sd = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in sd  # transformers stores a tied head once
    save_file(
        {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}, str(path / "model.safetensors")
    )
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.equal(
            load(path, quantize=None)(ids), load(checkpoints["tied-embeddings"], quantize=None)(ids)
        )


@pytest.mark.parametrize("name", ["phi4-mini-like", "partial-rotary"])
def test_triton_kernels_on_these_configs(checkpoints: dict[str, Path], name: str) -> None:
    """The Triton row-wise kernels (interpreter, fp32) and NF4 kernels run these shapes: partial rotary on the
    fused qkv included. Against the torch path: test_kernels_nf4's fp32 tolerance (reduction order only)."""
    ids = torch.randint(0, VOCAB, (2, 17))
    for quantize in (None, "nf4"):
        ref, ours = load(checkpoints[name], quantize=quantize), load(checkpoints[name], quantize=quantize)
        ours.set_kernel_backend("triton")
        for lin in ours.linears().values():
            lin.kernel_backend = "triton"
        with torch.no_grad():
            assert_close(ours(ids), ref(ids), torch.float32)


def test_every_eos_id_stops(checkpoints: dict[str, Path]) -> None:
    model = load(checkpoints["eos-list"], quantize=None)
    assert {2, 5, 7} <= stop_ids(model)


def test_released_sizes_keep_their_names_and_others_load_as_custom() -> None:
    v = REGISTRY["phi-3-medium-4k"]
    raw = {"model_type": "phi3", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
           "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
           "num_key_value_heads": v.num_key_value_heads, "vocab_size": v.vocab_size,
           "max_position_embeddings": v.max_position_embeddings}  # fmt: skip
    assert config_from_dict(raw).variant == "phi-3-medium-4k"
    # The 30-layer model (hidden 576, 9/3 heads, vocab 49152) and Phi-4-mini's shape: loaded as custom.
    small = raw | {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                   "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}  # fmt: skip
    assert config_from_dict(small).variant == CUSTOM
    phi4 = raw | {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24,
                  "num_key_value_heads": 8, "vocab_size": 200064, "partial_rotary_factor": 0.75,
                  "tie_word_embeddings": True, "max_position_embeddings": 131072,
                  "original_max_position_embeddings": 4096,
                  "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}}  # fmt: skip
    cfg = config_from_dict(phi4)
    assert (cfg.variant, cfg.head_dim, cfg.rotary_dim, cfg.tie_word_embeddings) == (CUSTOM, 128, 96, True)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "phi3small"}, "not a Phi-3-architecture checkpoint"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not Phi-3's 'silu'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear' is not supported"),
        ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ({"partial_rotary_factor": 0.1}, "partial_rotary_factor 0.1 gives 3 rotary features"),
    ],
)
def test_unsupported_configs_are_one_clear_line(
    checkpoints: dict[str, Path], tmp_path: Path, change: dict, message: str
) -> None:
    path = shutil.copytree(checkpoints["mha"], tmp_path / "bad")
    raw = json.loads((path / "config.json").read_text())
    if {"rope_scaling", "partial_rotary_factor"} & set(change):
        raw.pop(
            "rope_parameters"
        )  # transformers 5 writes both there, and that copy wins over a top-level one
    (path / "config.json").write_text(json.dumps(raw | change))
    with pytest.raises(Phi3FastError, match=message):
        load(path, quantize=None)
    res = CliRunner().invoke(main, ["generate", "--model", str(path), "hi"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and message.split("'")[0] in res.output
