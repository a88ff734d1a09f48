"""`phi3fast rag-data`: training rows that teach an adapter to read retrieved passages and cite them.

Each question with a source becomes chat rows {"messages": [system, user, assistant]} whose system and user turns
are what `phi3fast query --model` sends (phi3fast.rag.answer.build_messages over the real hybrid top-k,
distractors included). The gold passage is the best-ranked passage from the question's source that holds an
acceptable answer (else the best-ranked one from the source).

Targets (the assistant turn), citing the gold passage's number n:
- target="sentence": the passage's sentence (or table row, or list item) that holds the first acceptable answer
  found in it, copied as written, then " [n]."; when no single sentence holds one (an answer cut by the chunk
  border), the answer form below. Copying the stating sentence is what a small model learns from few rows: it
  has to find the sentence, not to rephrase it.
- target="answer": the first acceptable answer, "ANSWER [n]."

rows_per_question=N: row 0 has the passages in retrieval order (query's exact prompt); row v > 0 has the same
passages rotated by v places, so that the gold passage sits at another number and the target cites that one. A
model trained on retrieval order alone learns "copy from [1]"; the rotations make it find the passage.

Abstention rows: a seeded choice of round(no_gold_fraction * rows) of the rows whose gold was retrieved have
every passage from the source, and every passage holding an acceptable answer, removed; the next retrieved
passages take their places, and the target is the prompt's abstention sentence. With several rows per question,
the same question then appears with and without its answer. A question whose source is not in the top k at all
gets that target in every row (the passages really lack the answer); the stats count them apart.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3fast.errors import Phi3FastError
from phi3fast.eval.metrics import is_correct, normalize
from phi3fast.eval.questions import Question
from phi3fast.eval.report import atomic_write_text
from phi3fast.rag.answer import ABSTAIN_SENTENCE, build_messages
from phi3fast.rag.index import SearchResult

TARGETS = ("sentence", "answer")
# A line that starts a block of its own: a list item, a table row, a heading, a bold FAQ question.
_BLOCK_START = re.compile(r"^\s*(?:[-*+]\s|\d+[.)]\s|\||#|\*\*)")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?]\*\*))\s+(?=[A-Z0-9(\"'*])")


@dataclass(frozen=True)
class RagDataStats:
    rows: int
    cited: int  # rows whose target cites the gold passage
    removed: int  # rows whose gold passage was removed (target: the abstention sentence)
    missed: int  # rows whose source was not retrieved in the top k (target: the abstention sentence)
    sentences: int = 0  # cited rows whose target is a sentence copied from the gold passage


def gold_index(passages: Sequence[SearchResult], q: Question) -> int | None:
    """0-based position of the gold passage among the retrieved ones, None when the source was not retrieved."""
    from_source = [i for i, r in enumerate(passages) if r.source == q.source]
    holding = [i for i in from_source if is_correct(passages[i].text, q.answers)]
    return (holding or from_source or [None])[0]


def sentences(text: str) -> list[str]:
    """The text cut into sentences: lines that wrap a paragraph are joined; a list item, table row, heading or
    blank line starts a new block; blocks split after . ! or ? (closing bold too) followed by a capital, digit, bracket or bold."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            blocks.append([])
        elif not blocks or _BLOCK_START.match(line):
            blocks.append([line.strip()])
        else:
            blocks[-1].append(line.strip())
    out = []
    for b in blocks:
        out += [s.strip() for s in _SENTENCE_END.split(" ".join(b)) if s.strip()]
    return out


def answer_sentence(text: str, answers: Sequence[str]) -> str | None:
    """The first sentence of text that holds an acceptable answer (matched as eval matches), else None."""
    for s in sentences(text):
        if is_correct(s, answers):
            return s
    return None


def _without_gold(index: Any, q: Question, k: int) -> list[SearchResult]:
    """The top k passages that neither come from the source nor hold an acceptable answer."""
    want = 2 * k
    while True:
        results = index.search(q.question, k=want)
        kept = [r for r in results if r.source != q.source and not is_correct(r.text, q.answers)]
        if len(kept) >= k or len(results) < want:
            return kept[:k]
        want *= 2


def target(answer: str, n: int) -> str:
    return f"{answer.strip().rstrip('.')} [{n}]."


def _rotate(passages: Sequence[SearchResult], v: int) -> list[SearchResult]:
    """The passages moved v places down (the last v wrap to the top): passage i becomes number (i + v) % len."""
    v %= max(len(passages), 1)
    return list(passages[len(passages) - v :]) + list(passages[: len(passages) - v])


def _cite(q: Question, gold: SearchResult, n: int, kind: str) -> tuple[str, bool]:
    """The target citing passage n (the gold), and whether it is a copied sentence."""
    if kind == "sentence":
        s = answer_sentence(gold.text, q.answers)
        if s is not None:
            return target(s, n), True
    hit = [a for a in q.answers if normalize(a) in normalize(gold.text)]
    return target((hit or list(q.answers))[0], n), False


def rag_rows(
    index: Any,
    questions: Sequence[Question],
    k: int = 5,
    no_gold_fraction: float = 0.2,
    seed: int = 0,
    rows_per_question: int = 1,
    target_kind: str = "sentence",
) -> tuple[list[dict[str, Any]], RagDataStats]:
    """The chat rows for `questions` (each needs a source) over an open phi3fast.rag.Index."""
    if k < 1:
        raise Phi3FastError(f"k must be >= 1, got {k}")
    if rows_per_question < 1:
        raise Phi3FastError(f"rows_per_question must be >= 1, got {rows_per_question}")
    if not 0.0 <= no_gold_fraction <= 1.0:
        raise Phi3FastError(f"no_gold_fraction must be in [0, 1], got {no_gold_fraction}")
    if target_kind not in TARGETS:
        raise Phi3FastError(f"target must be one of {', '.join(TARGETS)}, got {target_kind!r}")
    for q in questions:
        if q.source is None:
            raise Phi3FastError(
                f"question on line {q.line} has no source (the document that holds the answer)"
            )
    retrieved = [index.search(q.question, k=k) for q in questions]
    golds = [gold_index(p, q) for p, q in zip(retrieved, questions, strict=True)]
    pairs = [(i, v) for i in range(len(questions)) for v in range(rows_per_question)]
    eligible = [(i, v) for i, v in pairs if golds[i] is not None]
    n_remove = min(round(no_gold_fraction * len(pairs)), len(eligible))
    if rows_per_question == 1:  # the same seeded choice as one row per question always made
        remove = {(i, 0) for i in random.Random(seed).sample([i for i, _ in eligible], n_remove)}
    else:
        remove = set(random.Random(seed).sample(eligible, n_remove))
    rows, copied = [], 0
    for i, v in pairs:
        q, passages, g = questions[i], retrieved[i], golds[i]
        if (i, v) in remove:
            passages = _without_gold(index, q, k)
        shown = _rotate(passages, v)
        if g is None or (i, v) in remove:
            reply = ABSTAIN_SENTENCE
        else:
            n = (g + v) % len(passages)
            reply, is_sentence = _cite(q, passages[g], n + 1, target_kind)
            copied += is_sentence
        rows.append(
            {"messages": [*build_messages(q.question, shown), {"role": "assistant", "content": reply}]}
        )
    missed = sum(rows_per_question for g in golds if g is None)
    stats = RagDataStats(
        rows=len(rows), cited=len(eligible) - n_remove, removed=n_remove, missed=missed, sentences=copied
    )
    return rows, stats


def check_target(path: str | Path) -> Path:
    """The output must be a file name in an existing folder (checked before any retrieval)."""
    path = Path(path)
    if path.is_dir():
        raise Phi3FastError(f"{path}: is a directory; give a file name")
    if not path.parent.is_dir():
        raise Phi3FastError(f"{path}: its folder {path.parent} does not exist")
    return path


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    path = check_target(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
