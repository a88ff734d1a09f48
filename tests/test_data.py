"""Data rows: validation errors name FILE:LINE; loss masks; <|end|> and eos are learned; packing isolation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phi3fast.errors import Phi3FastError
from phi3fast.training.data import (
    IGNORE_INDEX,
    build_rows,
    collate,
    encode_example,
    load_rows,
    pack,
    parse_row,
)

DATA = Path(__file__).parent / "data"

# Phi-3-mini-4k-instruct's chat template.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    """A throwaway byte-level BPE tokenizer with Phi-3's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    t.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog; what is a valve? a valve stops flow."] * 8, trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=PHI3_TEMPLATE
    )


def write_jsonl(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def trained_text(tok, sample) -> str:
    """Decode what the sample learns: the targets, in order."""
    return tok.decode([t for t in sample.labels if t != IGNORE_INDEX])


def test_fixture_file_loads():
    rows = load_rows(DATA / "train_memorize.jsonl")
    assert {r.kind for r in rows} == {"chat", "completion", "text"}
    assert rows[0].where.endswith("train_memorize.jsonl:1")


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"foo": 1}', "exactly one of"),
        ('{"text": "a", "messages": []}', "exactly one of"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": "hi"}', "non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role must be one of"),
        ('{"messages": [{"role": "user"}]}', "has no 'content'"),
        ('{"messages": [{"role": "user", "content": 3}]}', "must be a string"),
        ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant turn"),
        ('{"messages": [{"role": "assistant", "content": "a<|end|>b"}]}', "reserved chat marker <|end|>"),
        ('{"prompt": "p"}', "'prompt' without 'completion'"),
        ('{"completion": "c"}', "'completion' without 'prompt'"),
        ('{"prompt": "p", "completion": ""}', "'completion' is empty"),
        ('{"text": ""}', "'text' is empty"),
        ('{"text": null}', "must be a string"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, line, reason):
    p = write_jsonl(tmp_path, ['{"text": "fine"}', "", line])
    with pytest.raises(Phi3FastError) as e:
        load_rows(p)
    assert str(e.value).startswith(f"{p}:3: ")
    assert reason in str(e.value)


def test_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(Phi3FastError, match="cannot read data file"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(Phi3FastError, match="no rows"):
        load_rows(write_jsonl(tmp_path, ["", "  "]))
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    with pytest.raises(Phi3FastError, match=rf"{p}:2: not UTF-8"):
        load_rows(p)


def test_chat_learns_only_assistant_turns_and_their_end(tok):
    ex = parse_row(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is a valve?"},
                {"role": "assistant", "content": "a valve stops flow."},
                {"role": "user", "content": "the fox?"},
                {"role": "assistant", "content": "quick brown"},
            ]
        },
        "f:1",
    )
    s = encode_example(tok, ex)
    full = tok.apply_chat_template([{"role": r, "content": c} for r, c in ex.messages], tokenize=False)
    assert list(s.input_ids) == tok(full, add_special_tokens=False)["input_ids"]
    # Exactly the assistant contents with their <|end|>, nothing of the system/user turns or the markers.
    assert trained_text(tok, s) == "a valve stops flow.<|end|>quick brown<|end|>"
    end_id = tok.convert_tokens_to_ids("<|end|>")
    assert sum(1 for t in s.labels if t == end_id) == 2
    # Targets are shifted: position t predicts token t+1.
    for t, lab in enumerate(s.labels[:-1]):
        assert lab in (IGNORE_INDEX, s.input_ids[t + 1])
    assert s.labels[-1] == IGNORE_INDEX


def test_opening_assistant_turn(tok):
    s = encode_example(tok, parse_row({"messages": [{"role": "assistant", "content": "the dog"}]}, "f:1"))
    assert trained_text(tok, s) == "the dog<|end|>"


def test_completion_and_text_learn_eos_even_though_pad_is_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id
    s = encode_example(tok, parse_row({"prompt": "what is a valve? ", "completion": "a valve"}, "f:1"))
    assert trained_text(tok, s) == "a valve<|endoftext|>"
    s = encode_example(tok, parse_row({"text": "the lazy dog"}, "f:1"))
    assert tok.decode(s.input_ids) == "the lazy dog<|endoftext|>"
    # All tokens but the first are targets (nothing before the first predicts it), eos included.
    assert [t for t in s.labels if t != IGNORE_INDEX] == list(s.input_ids[1:])
    # After collating with pads (same id as eos), the eos target survives and pads are ignored.
    rows, _ = build_rows([parse_row({"text": t}, "f:1") for t in ["the", "the lazy dog"]], tok, 64, False)
    b = collate(rows, tok.pad_token_id)
    assert int((b.input_ids[0] == tok.pad_token_id).sum()) > 1  # eos and pads share the id...
    assert int((b.labels[0] == tok.eos_token_id).sum()) == 1  # ...but only the eos is a target
    assert b.labels[0, len(rows[0].input_ids) - 2] == tok.eos_token_id


def test_template_that_is_not_phi3_is_an_error(tok):
    bad = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
    bad.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    ex = parse_row(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "f:7"
    )
    with pytest.raises(Phi3FastError, match="f:7: the tokenizer's chat template"):
        encode_example(bad, ex)


def test_truncation(tok):
    ex = parse_row({"text": "the quick brown fox jumps over the lazy dog"}, "f:1")
    s = encode_example(tok, ex, max_len=4)
    assert s.truncated and len(s.input_ids) == 4
    long_prompt = parse_row(
        {"prompt": "the quick brown fox jumps over the lazy dog", "completion": "x"}, "f:9"
    )
    rows, stats = build_rows([ex, long_prompt], tok, 4, False)
    assert (stats.samples, stats.truncated, stats.dropped) == (1, 1, 1) and len(rows) == 1
    with pytest.raises(Phi3FastError, match="f: no row has a trained token within seq_len 3"):
        build_rows([long_prompt], tok, 3, False)


@pytest.mark.parametrize("seq_len", [17, 32, 130])
def test_packing_keeps_samples_whole_and_separate(tok, seq_len):
    texts = ["the fox", "a valve stops flow.", "the quick brown fox jumps", "dog", "what is a valve?"] * 3
    examples = [parse_row({"text": t}, f"f:{i}") for i, t in enumerate(texts, 1)]
    samples = [encode_example(tok, e, seq_len) for e in examples]
    rows = pack(samples, seq_len, tok.pad_token_id)
    assert all(len(r.input_ids) == seq_len for r in rows)
    # Every sample appears exactly once, contiguous, with positions 0.. and its own seq id.
    seen = []
    for r in rows:
        for k in sorted(set(r.seq_ids) - {0}):
            idx = [i for i, s in enumerate(r.seq_ids) if s == k]
            assert idx == list(range(idx[0], idx[0] + len(idx)))
            assert [r.position_ids[i] for i in idx] == list(range(len(idx)))
            seen.append(([r.input_ids[i] for i in idx], [r.labels[i] for i in idx]))
        # Pads: seq id 0, no loss.
        assert all(r.labels[i] == IGNORE_INDEX for i, s in enumerate(r.seq_ids) if s == 0)
    assert seen == [(list(s.input_ids), list(s.labels)) for s in samples]
    # No target ever crosses a sample boundary: the last token of each sample has no target.
    b = collate(rows, tok.pad_token_id)
    assert b.seq_ids is not None and b.position_ids is not None
    assert b.n_targets == sum(sum(1 for t in s.labels if t != IGNORE_INDEX) for s in samples)
    assert b.n_tokens == sum(len(s.input_ids) for s in samples)


def test_unpacked_collate_right_pads(tok):
    rows, _ = build_rows(
        [parse_row({"text": t}, "f:1") for t in ["the", "the quick brown fox"]], tok, 64, False
    )
    b = collate(rows, tok.pad_token_id)
    assert b.position_ids is None and b.seq_ids is None
    n0 = len(rows[0].input_ids)
    assert torch.equal(b.input_ids[0, :n0], torch.tensor(rows[0].input_ids))
    assert (b.labels[0, n0:] == IGNORE_INDEX).all()
    assert b.n_tokens == sum(len(r.input_ids) for r in rows)


def test_fixture_rows_are_valid_json():
    for line in (DATA / "train_memorize.jsonl").read_text().splitlines():
        json.loads(line)
