"""Chat-template turn structure (chat_turns) and the Ollama TEMPLATE built from it.

The Go TEMPLATE is executed by Go's own text/template (the engine Ollama uses) when a Go toolchain is present,
and must render the same text as the Jinja template (transformers' apply_chat_template), BOS aside."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from phi3fast.interop.ollama import go_template, modelfile
from phi3fast.model.chat import PHI3_CHAT_TEMPLATE
from phi3fast.model.chat_turns import chat_turns, end_of_turn
from phi3fast.model.tiny import train_tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2's: ChatML that adds a default system turn when the conversation has none.
SMOL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]  # fmt: skip


@pytest.fixture(scope="module")
def base_tok():  # noqa: ANN201
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer(512)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")


def _with(tok, template: str, bos: str = "<s>"):  # noqa: ANN001, ANN202
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = template
    t.bos_token = bos
    return t


def test_phi3_turns(base_tok) -> None:  # noqa: ANN001
    tok = _with(base_tok, PHI3_CHAT_TEMPLATE)
    t = chat_turns(tok)
    assert t.head == "" and t.default_system is None
    assert t.prefix == {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
    assert t.suffix == {"system": "<|end|>\n", "user": "<|end|>\n", "assistant": "<|end|>\n"}
    assert t.generation_prompt == "<|assistant|>\n"
    assert end_of_turn(tok, t) == "<|end|>"


def test_chatml_turns_with_default_system(base_tok) -> None:  # noqa: ANN001
    for template, default in (
        (CHATML, None),
        (SMOL, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    ):
        tok = _with(base_tok, template)
        t = chat_turns(tok)
        assert t.head == "" and t.default_system == default
        assert t.prefix["user"] == "<|im_start|>user\n" and t.prefix["system"] == "<|im_start|>system\n"
        assert t.suffix["assistant"] == "<|im_end|>\n"
        assert t.generation_prompt == "<|im_start|>assistant\n"
        assert end_of_turn(tok, t) == "<|im_end|>"


def test_llama3_turns(base_tok) -> None:  # noqa: ANN001
    tok = _with(base_tok, LLAMA3, bos="<|begin_of_text|>")
    t = chat_turns(tok)
    assert t.head == "<|begin_of_text|>" and t.default_system is None
    assert t.prefix["assistant"] == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert t.suffix == {r: "<|eot_id|>" for r in ("system", "user", "assistant")}
    assert end_of_turn(tok, t) == "<|eot_id|>"


def test_modelfile_lines(base_tok) -> None:  # noqa: ANN001
    tok = _with(base_tok, SMOL)
    text = modelfile("m.gguf", tok, [tok.convert_tokens_to_ids("<|im_end|>")])
    lines = text.splitlines()
    assert lines[0] == "FROM ./m.gguf"
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in lines
    assert [ln for ln in lines if ln.startswith("PARAMETER")] == ["PARAMETER stop <|im_end|>"]


_GO = r"""
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	var in struct {
		Template string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("t").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain to run Ollama's template engine")
@pytest.mark.parametrize("name", ["phi3", "chatml", "smol", "llama3"])
def test_go_template_renders_as_jinja(base_tok, tmp_path: Path, name: str) -> None:  # noqa: ANN001
    template, bos = {"phi3": (PHI3_CHAT_TEMPLATE, "<s>"), "chatml": (CHATML, "<s>"), "smol": (SMOL, "<|im_start|>"),
                     "llama3": (LLAMA3, "<|begin_of_text|>")}[name]  # fmt: skip
    tok = _with(base_tok, template, bos)
    turns = chat_turns(tok)
    go = go_template(turns)
    (tmp_path / "main.go").write_text(_GO)
    exe = tmp_path / "render"
    subprocess.run(["go", "build", "-o", str(exe), str(tmp_path / "main.go")], check=True, cwd=tmp_path)
    convs = [
        [{"role": "user", "content": "What is NF4?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Index docs/?"}],
    ]  # fmt: skip
    for conv in convs:
        jinja = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        # Ollama adds the Modelfile's SYSTEM as a message when a request has none.
        msgs = conv
        if turns.default_system and conv[0]["role"] != "system":
            msgs = [{"role": "system", "content": turns.default_system}, *conv]
        data = {"Template": go, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in msgs]}
        out = subprocess.run(
            [str(exe)], input=json.dumps(data), capture_output=True, text=True, check=True
        ).stdout
        assert turns.head + out == jinja
