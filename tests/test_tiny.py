"""init-tiny: a transformers-loadable Phi-3 checkpoint with Phi-3's tokens, chat template and padded vocab."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from phi3fast.cli import main
from phi3fast.errors import Phi3FastError
from phi3fast.model.tiny import CORPUS, PHI3_ADDED, init_tiny

SIZES = dict(hidden=64, layers=2, heads=4, intermediate=128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("t") / "tiny", **SIZES, vocab=1024)


def test_transformers_loads_it(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    model = AutoModelForCausalLM.from_pretrained(str(tiny))
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert model.get_input_embeddings().weight.shape == (1024, 64)
    # Phi-3's tokens, in Phi-3's order, after the learned ones; pad == eos == <|endoftext|>.
    ids = [tok.convert_tokens_to_ids(t) for t in PHI3_ADDED]
    assert ids == list(range(ids[0], ids[0] + len(PHI3_ADDED))) and ids[-1] == len(tok) - 1
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == model.config.eos_token_id == model.config.pad_token_id
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_token_id, ids[1], tok.convert_tokens_to_ids("<|end|>")]


def test_chat_template_and_special_tokens(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|user|>") in ids and tok.convert_tokens_to_ids("<|end|>") in ids
    assert tok.decode(ids) == text  # byte-level BPE round-trips exactly
    done = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Hello."}], tokenize=False)
    assert done.endswith("<|assistant|>\nHello.<|end|>\n<|endoftext|>")
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_vocab_is_padded_beyond_learned_tokens(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = init_tiny(tmp_path / "big", **SIZES, vocab=5000)  # more than a few KB of text can fill
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) < 5000
    assert AutoModelForCausalLM.from_pretrained(str(out)).get_input_embeddings().weight.shape[0] == 5000
    small = init_tiny(tmp_path / "small", **SIZES, vocab=270)  # the minimum: bytes and specials, no merges
    assert len(AutoTokenizer.from_pretrained(str(small))) == 270


def test_seeded_and_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = load_file(str(init_tiny(tmp_path / "a", **SIZES, vocab=1024) / "model.safetensors"))
    first = load_file(str(tiny / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert (tiny / "tokenizer.json").read_text() == (tmp_path / "a" / "tokenizer.json").read_text()
    other = load_file(str(init_tiny(tmp_path / "b", **SIZES, vocab=1024, seed=1) / "model.safetensors"))
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])
    assert (
        "model.layers.1.self_attn.qkv_proj.weight" in first
        and "model.layers.0.mlp.gate_up_proj.weight" in first
    )


def test_bad_arguments(tiny: Path, tmp_path: Path) -> None:
    # The library names its arguments; the CLI says the same thing with its flags.
    with pytest.raises(Phi3FastError, match="^vocab 269 is too small"):
        init_tiny(tmp_path / "x", **SIZES, vocab=269)
    with pytest.raises(Phi3FastError, match="^hidden 64 must split into 3 heads"):
        init_tiny(tmp_path / "x", hidden=64, heads=3)
    with pytest.raises(Phi3FastError, match="^intermediate 100 must be a multiple of 64"):
        init_tiny(tmp_path / "x", hidden=64, intermediate=100)
    for args, line in [
        (["--vocab", "269"], "error: --vocab 269 is too small"),
        (["--hidden", "64", "--heads", "3"], "error: --hidden 64 must split into 3 heads"),
        (["--hidden", "64", "--intermediate", "100"], "error: --intermediate 100 must be a multiple of 64"),
    ]:
        res = CliRunner().invoke(main, ["init-tiny", str(tmp_path / "x"), *args])
        assert res.exit_code == 2 and res.output.startswith(line), res.output
    with pytest.raises(Phi3FastError, match="already exists"):
        init_tiny(tiny)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))  # nothing half-written


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    args = [
        "init-tiny",
        str(tmp_path / "c"),
        "--hidden",
        "64",
        "--layers",
        "1",
        "--heads",
        "2",
        "--vocab",
        "400",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "c" / "config.json").read_text())["num_hidden_layers"] == 1
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and "already exists" in result.output


def test_corpus_ships_in_the_package() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["scikit-build"]["wheel"][
        "packages"
    ]
    # scikit-build-core copies every file under a mapped package directory into the wheel.
    assert mapping["phi3fast"] == "phi3fast" and CORPUS.is_relative_to(root / "phi3fast")
    assert CORPUS.stat().st_size > 2000
