"""`phi3fast rag-data`: training rows that teach an adapter to read retrieved passages and cite them.

Each question with a source becomes one chat row {"messages": [system, user, assistant]} whose system and user
turns are exactly what `phi3fast query --model` sends (phi3fast.rag.answer.build_messages over the real hybrid
top-k, distractors included). The gold passage is the best-ranked passage from the question's source that holds
an acceptable answer (else the best-ranked one from the source); the assistant turn states the first acceptable
answer and cites the gold passage's number: "ANSWER [n]."

Abstention rows: a seeded choice of round(no_gold_fraction * rows) of the questions whose gold was retrieved have
every passage from the source, and every passage holding an acceptable answer, removed; the next retrieved
passages take their places, and the target is the prompt's abstention sentence. A question whose source is not
in the top k at all gets that target too (the passages really lack the answer); the stats count them apart.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3fast.errors import Phi3FastError
from phi3fast.eval.metrics import is_correct
from phi3fast.eval.questions import Question
from phi3fast.eval.report import atomic_write_text
from phi3fast.rag.answer import ABSTAIN_SENTENCE, build_messages
from phi3fast.rag.index import SearchResult


@dataclass(frozen=True)
class RagDataStats:
    rows: int
    cited: int  # rows whose target cites the gold passage
    removed: int  # rows whose gold passage was removed (target: the abstention sentence)
    missed: int  # rows whose source was not retrieved in the top k (target: the abstention sentence)


def gold_index(passages: Sequence[SearchResult], q: Question) -> int | None:
    """0-based position of the gold passage among the retrieved ones, None when the source was not retrieved."""
    from_source = [i for i, r in enumerate(passages) if r.source == q.source]
    holding = [i for i in from_source if is_correct(passages[i].text, q.answers)]
    return (holding or from_source or [None])[0]


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


def rag_rows(
    index: Any, questions: Sequence[Question], k: int = 5, no_gold_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, Any]], RagDataStats]:
    """The chat rows for `questions` (each needs a source) over an open phi3fast.rag.Index."""
    if k < 1:
        raise Phi3FastError(f"k must be >= 1, got {k}")
    if not 0.0 <= no_gold_fraction <= 1.0:
        raise Phi3FastError(f"no_gold_fraction must be in [0, 1], got {no_gold_fraction}")
    for q in questions:
        if q.source is None:
            raise Phi3FastError(
                f"question on line {q.line} has no source (the document that holds the answer)"
            )
    retrieved = [index.search(q.question, k=k) for q in questions]
    golds = [gold_index(p, q) for p, q in zip(retrieved, questions, strict=True)]
    eligible = [i for i, g in enumerate(golds) if g is not None]
    n_remove = min(round(no_gold_fraction * len(questions)), len(eligible))
    remove = set(random.Random(seed).sample(eligible, n_remove))
    rows = []
    for i, (q, passages, g) in enumerate(zip(questions, retrieved, golds, strict=True)):
        if i in remove:
            passages = _without_gold(index, q, k)
        reply = ABSTAIN_SENTENCE if g is None or i in remove else target(q.answers[0], g + 1)
        messages = build_messages(q.question, passages)
        rows.append({"messages": [*messages, {"role": "assistant", "content": reply}]})
    stats = RagDataStats(
        rows=len(rows),
        cited=len(eligible) - n_remove,
        removed=n_remove,
        missed=len(questions) - len(eligible),
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
