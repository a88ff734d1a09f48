"""{"messages"} rows under any chat template: the trained tokens are each assistant turn and the marker that ends
it, whatever the template (Phi-3's <|end|>, ChatML's <|im_end|>, Llama-3's <|eot_id|>). The expected masks are
written by hand as the rendered text cut into (segment, trained) pieces."""

from __future__ import annotations

import copy

import pytest
from phi3fast.kernels.cross_entropy import IGNORE_INDEX

from phi3fast.errors import Phi3FastError
from phi3fast.model.chat import PHI3_CHAT_TEMPLATE
from phi3fast.model.tiny import train_tokenizer
from phi3fast.training.data import encode_example, parse_row

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]  # fmt: skip
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]
# The rendered conversation, by hand: (text, trained).
EXPECTED = {
    "phi3": [
        ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n", False),
        ("Hello.<|end|>", True),
        ("\n<|user|>\nBye<|end|>\n<|assistant|>\n", False),
        ("See you.<|end|>", True),
        ("\n<|endoftext|>", False),
    ],
    "chatml": [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello.<|im_end|>", True),
        ("\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
        ("See you.<|im_end|>", True),
        ("\n", False),
    ],
    "llama3": [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Hello.<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("See you.<|eot_id|>", True),
    ],
}  # fmt: skip
TEMPLATES = {
    "phi3": (PHI3_CHAT_TEMPLATE, "<s>"),
    "chatml": (CHATML, "<s>"),
    "llama3": (LLAMA3, "<|begin_of_text|>"),
}


@pytest.fixture(scope="module")
def base_tok():  # noqa: ANN201
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer(512)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")


def _tok(base, name: str):  # noqa: ANN001, ANN202
    tok = copy.deepcopy(base)
    tok.chat_template, tok.bos_token = TEMPLATES[name]
    return tok


@pytest.mark.parametrize("name", list(EXPECTED))
def test_label_mask_equals_hand_computed(base_tok, name: str) -> None:  # noqa: ANN001
    tok = _tok(base_tok, name)
    text = "".join(seg for seg, _ in EXPECTED[name])
    assert tok.apply_chat_template(CONV, tokenize=False) == text  # the hand rendering is the template's
    spans, pos = [], 0
    for seg, trained in EXPECTED[name]:
        if trained:
            spans.append((pos, pos + len(seg)))
        pos += len(seg)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    trained = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
    want = [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]

    sample = encode_example(tok, parse_row({"messages": CONV}, "f:1"))
    assert list(sample.input_ids) == ids
    assert list(sample.labels) == want
    learned = tok.decode([t for t in sample.labels if t != IGNORE_INDEX])
    assert learned == "".join(seg for seg, tr in EXPECTED[name] if tr)


def test_template_without_end_marker_is_an_error(base_tok) -> None:  # noqa: ANN001
    tok = copy.deepcopy(base_tok)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    ex = parse_row(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "f:3"
    )
    with pytest.raises(
        Phi3FastError, match="f:3: the tokenizer's chat template ends assistant turns with no"
    ):
        encode_example(tok, ex)


def test_template_markers_in_content_are_refused(base_tok) -> None:  # noqa: ANN001
    tok = _tok(base_tok, "chatml")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<|im_end|>b"}]}
    with pytest.raises(
        Phi3FastError, match=r"f:4: messages\[1\].content contains the special token <\|im_end\|>"
    ):
        encode_example(tok, parse_row(row, "f:4"))
