"""`make demo`'s training rows and wiring: the rows are exactly `phi3fast query --model`'s prompts, every answer is
one sentence grounded in the passage it cites, the demo's own question is not among them, and the Makefile trains
on them and asks with the adapter.

The demo's fine-tuned answer on the real model is checked in tests/test_demo_real.py (slow)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from demo_helpers import DATA, ROOT, make_var

from phi3fast.rag.answer import SYSTEM_PROMPT, build_messages, cited
from phi3fast.rag.index import SearchResult


def parse_user(content: str) -> tuple[str, list[SearchResult]]:
    """(question, passages) back out of a user turn, so the rows can be rebuilt with build_messages."""
    assert content.startswith("Passages:\n\n")
    body, question = content[len("Passages:\n\n") :].rsplit("\n\nQuestion: ", 1)
    passages = []
    for i, block in enumerate(body.split("\n\n"), 1):
        m = re.fullmatch(r"\[(\d+)\] \((.+?)\)\n(.+)", block, re.S)
        assert m is not None and int(m.group(1)) == i, block
        source, _, heading = m.group(2).partition(" > ")
        passages.append(SearchResult(i, source, heading, 0.0, m.group(3), 0, len(m.group(3))))
    return question, passages


def rows() -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in DATA.read_text(encoding="utf-8").splitlines()]


def test_rows_are_query_prompts_with_one_cited_sentence() -> None:
    data = rows()
    assert len(data) >= 24
    cited_numbers = set()
    for messages in data:
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[0]["content"] == SYSTEM_PROMPT
        question, passages = parse_user(messages[1]["content"])
        assert len(passages) == 2  # the demo asks with -k 2
        assert build_messages(question, passages) == messages[:2]
        answer = messages[2]["content"]
        # One sentence that ends with its citation: "... [n]."
        m = re.fullmatch(r"[A-Z][^\n\[\]]+ \[(\d)\]\.", answer)
        assert m is not None, answer
        n = int(m.group(1))
        assert cited(answer, len(passages)) == [n]
        cited_numbers.add(n)
        # Grounded: every `code` span and number the answer states is in the passage it cites.
        facts = re.findall(r"`[^`]+`", answer) + re.findall(r"\b\d[\d.:%]*\b", answer[: m.start(1) - 1])
        for fact in facts:
            assert fact.rstrip(".") in passages[n - 1].text, (fact, answer)
    assert cited_numbers == {1, 2}  # the answer is not always in the first passage


def test_demo_question_is_not_trained_on() -> None:
    """The demo shows what the adapter learned (read, answer, cite), not a memorized reply."""
    demo_q = make_var("DEMO_Q")
    text = DATA.read_text(encoding="utf-8").lower()
    assert demo_q.lower() not in text
    assert "resume" not in text and "interrupt" not in text


@pytest.mark.skipif(shutil.which("make") is None, reason="no `make` on PATH")
def test_make_demo_trains_on_the_rows_and_asks_with_the_adapter(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    # -n prints the recipe without running it; -o keeps make from (re)building the venv and the model.
    cmd = ["make", "-n", "demo", f"DEMO_OUT={out}", "DEMO_MODEL=M", "-o", "M", "-o", ".venv/.phi3fast-demo"]
    recipe = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    lines = re.sub(r"\\\n\s*", "", recipe).splitlines()  # join continued lines
    train = [ln for ln in lines if "phi3fast train " in ln]
    asks = [ln for ln in lines if "phi3fast query " in ln and "--model M" in ln]
    assert len(train) == 1 and len(asks) == 2
    assert "--data phi3fast/assets/demo_house_style.jsonl" in train[0]
    assert f"--out {out}/adapter" in train[0]
    assert f"--adapter {out}/adapter" not in asks[0] and f"--adapter {out}/adapter" in asks[1]
    for ask in asks:
        assert f'"{make_var("DEMO_Q")}"' in ask and " -k 2 " in ask
    seq_len = int(re.search(r"--seq-len (\d+)", train[0]).group(1))
    assert seq_len >= 320  # the longest row is under 320 tokens with SmolLM2's tokenizer (test_demo_real.py)
