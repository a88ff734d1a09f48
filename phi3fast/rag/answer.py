"""Answer a question from retrieved passages with Phi-3 (optionally with a LoRA adapter): RAG + fine-tuning.

The prompt is Phi-3's chat template: a system message that sets the rules (use only the passages, cite them as
[1], [2], say so when they do not hold the answer) and a user message with the numbered passages, each headed
by its source and heading, then the question. Passages are numbered in retrieval rank order, so [1] is the best
match; the numbers in the answer refer to the sources listed under it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from phi3fast.rag.index import SearchResult

if TYPE_CHECKING:  # torch and the model load only when an answer is asked for
    from phi3fast.model import Phi3ForCausalLM

# The one sentence a reply gives when the passages lack the answer: fixed, so that `phi3fast eval` can count
# abstentions and `phi3fast rag-data` can teach it.
ABSTAIN_SENTENCE = "The passages do not contain the answer."
SYSTEM_PROMPT = (
    "You are a careful technical assistant. Answer the question using only the numbered passages. "
    "Cite the passages you use by their numbers in square brackets, like [1] or [2][3]. "
    f"If the passages do not contain the answer, reply exactly: {ABSTAIN_SENTENCE}"
)


def passage_label(r: SearchResult) -> str:
    return f"{r.source} > {r.heading}" if r.heading else r.source


def build_messages(question: str, passages: Sequence[SearchResult]) -> list[dict[str, str]]:
    """The chat messages for a question and its numbered passages."""
    blocks = [f"[{i}] ({passage_label(r)})\n{r.text.strip()}" for i, r in enumerate(passages, 1)]
    user = "Passages:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question.strip()}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def fit_passages(
    model: Phi3ForCausalLM, question: str, passages: Sequence[SearchResult], max_new_tokens: int
) -> list[SearchResult]:
    """Drop the lowest-ranked passages until prompt + answer fit the model's context window."""
    from phi3fast.generate import chat_prompt_ids

    kept = list(passages)
    limit = int(model.config.max_position_embeddings) - max_new_tokens
    while len(kept) > 1 and len(chat_prompt_ids(model, build_messages(question, kept))) > limit:
        kept.pop()
    return kept


def cited(answer: str, n: int) -> list[int]:
    """Passage numbers (1-based, within 1..n) the answer cites, in first-cited order."""
    out: list[int] = []
    for m in re.finditer(r"\[(\d+)\]", answer):
        i = int(m.group(1))
        if 1 <= i <= n and i not in out:
            out.append(i)
    return out


@dataclass(frozen=True)
class AnswerConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # greedy: the same passages give the same answer
    top_p: float = 1.0
    seed: int | None = None


def stream_answer(
    model: Phi3ForCausalLM,
    question: str,
    passages: Sequence[SearchResult],
    cfg: AnswerConfig = AnswerConfig(),  # noqa: B008  (frozen, so a shared default is safe)
) -> tuple[list[SearchResult], Iterator[str]]:
    """(the passages actually given to the model, the streamed answer pieces)."""
    from phi3fast.generate import stream_chat

    kept = fit_passages(model, question, passages, cfg.max_new_tokens)
    stream = stream_chat(
        model,
        build_messages(question, kept),
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
    )
    return kept, stream


def sources_block(passages: Sequence[SearchResult], answer: str) -> str:
    """The sources listed under an answer: every numbered passage, the cited ones marked with '*'."""
    used = set(cited(answer, len(passages)))
    lines = ["Sources:"]
    for i, r in enumerate(passages, 1):
        mark = "*" if i in used else " "
        lines.append(f"{mark}[{i}] {passage_label(r)} (chars {r.start}-{r.end})")
    return "\n".join(lines)
