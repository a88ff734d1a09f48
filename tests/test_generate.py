"""Generation: greedy equals transformers' greedy generate (KV cache, LongRoPE switch), determinism, sampling,
top-p, stopping at <|end|>, streaming CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from model_helpers import VOCAB, make_tiny
from torch import nn

from phi3fast.cli import main
from phi3fast.errors import Phi3FastError
from phi3fast.generate import chat_prompt_ids, generate_text, generate_tokens, sample, stop_ids, stream_chat
from phi3fast.model import load

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How often grease the bearings?"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory)


def hf_greedy(path: Path, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=sorted(stop), pad_token_id=0
    )[0, len(prompt) :].tolist()
    return out[: next((i for i, t in enumerate(out) if t in stop), len(out))]


def test_greedy_matches_transformers_generate(tiny: Path) -> None:
    model = load(tiny, quantize=None)
    prompt, stop = chat_prompt_ids(model, MESSAGES), stop_ids(model)
    ours = list(generate_tokens(model, prompt, max_new_tokens=24, stop=stop))
    assert len(ours) > 5
    assert ours == hf_greedy(tiny, prompt, 24, stop)


def test_longrope_switch_matches_transformers(tiny: Path, tmp_path: Path) -> None:
    """Crossing original_max_position_embeddings mid-generation re-encodes with the long factors, as transformers."""
    dst = shutil.copytree(tiny, tmp_path / "lr")
    raw = json.loads((dst / "config.json").read_text())
    g = torch.Generator().manual_seed(1)
    raw.update(
        max_position_embeddings=128,
        original_max_position_embeddings=32,
        rope_scaling={
            "type": "longrope",
            "short_factor": (1 + torch.rand(8, generator=g)).tolist(),
            "long_factor": (1 + 6 * torch.rand(8, generator=g)).tolist(),
        },  # fmt: skip
    )
    (dst / "config.json").write_text(json.dumps(raw))
    model = load(dst, quantize=None)
    prompt = torch.randint(0, VOCAB, (20,)).tolist()
    ours = list(generate_tokens(model, prompt, max_new_tokens=30, stop=set()))
    assert len(ours) == 30
    assert ours == hf_greedy(dst, prompt, 30, {-1})


def test_greedy_is_deterministic_nf4(tiny: Path) -> None:
    model = load(tiny)
    first = generate_text(model, MESSAGES, max_new_tokens=16)
    assert first and first == generate_text(model, MESSAGES, max_new_tokens=16)
    assert "".join(stream_chat(model, MESSAGES, max_new_tokens=16)) == first


def test_sampling_is_seeded(tiny: Path) -> None:
    model = load(tiny)
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = list(generate_tokens(model, [5, 6, 7], seed=1, **kw))
    assert a == list(generate_tokens(model, [5, 6, 7], seed=1, **kw))
    assert a != list(generate_tokens(model, [5, 6, 7], seed=2, **kw))
    greedy = list(generate_tokens(model, [5, 6, 7], max_new_tokens=8))
    assert (
        list(generate_tokens(model, [5, 6, 7], max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3))
        == greedy
    )


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.tensor([0.5, 0.3, 0.2, 0.0]).log()
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, 0.6, g) for _ in range(300)} == {0, 1}
    assert {sample(logits, 1.0, 0.5, g) for _ in range(50)} == {0}
    assert {sample(logits, 1.0, 1.0, g) for _ in range(300)} == {0, 1, 2}
    assert sample(logits, 0.0, 1.0, None) == 0


class _Scripted(nn.Module):
    """lm_head replacement: the first call (prefill) prefers token `first`, later calls prefer `then`."""

    def __init__(self, first: int, then: int) -> None:
        super().__init__()
        self.first, self.then, self.calls = first, then, 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*h.shape[:-1], VOCAB)
        out[..., self.first if self.calls == 0 else self.then] = 1.0
        self.calls += 1
        return out


def test_stops_at_end_token(tiny: Path) -> None:
    model = load(tiny)
    tok = model.tokenizer
    word = tok("grease", add_special_tokens=False)["input_ids"][0]
    end = tok.convert_tokens_to_ids("<|end|>")
    assert {end, tok.eos_token_id} <= stop_ids(model)
    model.lm_head = _Scripted(word, end)
    assert generate_text(model, MESSAGES, max_new_tokens=50) == tok.decode([word])


def test_bad_requests(tiny: Path) -> None:
    model = load(tiny)
    with pytest.raises(Phi3FastError, match=r"messages\[0\]"):
        generate_text(model, [{"role": "robot", "content": "hi"}])
    with pytest.raises(Phi3FastError, match="exceeds the context"):
        list(generate_tokens(model, [5] * 4096))
    with pytest.raises(Phi3FastError, match="temperature"):
        list(generate_tokens(model, [5], temperature=-1.0))


def test_cli_streams_the_reply(tiny: Path, tmp_path: Path) -> None:
    from phi3fast.lora import LoraConfig, apply_lora, lora_parameters, save_adapter

    model = load(tiny)
    apply_lora(model, LoraConfig(r=2))
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.3)
    save_adapter(model, tmp_path / "ad")
    model.eval()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello"}]
    expected = generate_text(model, messages, max_new_tokens=12)
    args = ["generate", "--model", str(tiny), "--adapter", str(tmp_path / "ad"), "--system", "S", "Hello"]
    result = CliRunner().invoke(main, [*args, "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert result.output == expected + "\n"
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "nope"), "hi"])
    assert result.exit_code == 2 and "no such checkpoint directory" in result.output
