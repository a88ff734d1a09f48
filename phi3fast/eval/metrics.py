"""The figures of `phi3fast eval`, each computed from the rows of answers.jsonl alone, so anyone can recompute them.

Per row (a question answered in one mode):
- correct: some acceptable answer is a substring of the reply after both are lowercased and every run of
  whitespace is collapsed to one space (`normalize`);
- token F1: over lowercase word tokens (`\\w+`), the best F1 against any acceptable answer;
- abstained (RAG modes): the reply contains the abstention sentence the RAG prompt prescribes, normalized the
  same way and without its closing period.

Per mode: n; accuracy and token_f1 (means); hit_at_k (the question's source is among the retrieved passages) and
citation_accuracy (the first passage the reply cites comes from the source; no citation counts as wrong), both
over the rows that have a source; abstention (mean); latency_p50_s / latency_p95_s (numpy's default linear
percentiles of latency_s); tokens_per_s = sum(new_tokens) / sum(latency_s). A figure that does not apply (a
retrieval figure outside the RAG modes, or no row with a source) is None.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from phi3fast.rag.answer import ABSTAIN_SENTENCE

RAG_MODES = ("rag", "ft+rag")
MODES = ("base", "rag", "ft", "ft+rag")
METRICS = (
    "n",
    "accuracy",
    "token_f1",
    "hit_at_k",
    "citation_accuracy",
    "abstention",
    "latency_p50_s",
    "latency_p95_s",
    "tokens_per_s",
)
UNCATEGORIZED = "uncategorized"


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def is_correct(reply: str, answers: Iterable[str]) -> bool:
    r = normalize(reply)
    return any(normalize(a) in r for a in answers)


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(reply: str, answers: Iterable[str]) -> float:
    got = Counter(_tokens(reply))
    best = 0.0
    for a in answers:
        want = Counter(_tokens(a))
        common = sum((got & want).values())
        if common:
            p, r = common / sum(got.values()), common / sum(want.values())
            best = max(best, 2 * p * r / (p + r))
    return best


def abstains(reply: str) -> bool:
    return normalize(ABSTAIN_SENTENCE).rstrip(".") in normalize(reply)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(rows: Sequence[dict[str, Any]], rag: bool) -> dict[str, Any]:
    """The figures of one mode (or one category of it) over its rows of answers.jsonl."""
    sourced = [r for r in rows if r.get("source") is not None]
    latency = [float(r["latency_s"]) for r in rows]
    total_s = sum(latency)
    out: dict[str, Any] = {
        "n": len(rows),
        "accuracy": _mean([float(r["correct"]) for r in rows]),
        "token_f1": _mean([float(r["token_f1"]) for r in rows]),
        "hit_at_k": None,
        "citation_accuracy": None,
        "abstention": None,
        "latency_p50_s": float(np.percentile(latency, 50)) if rows else None,
        "latency_p95_s": float(np.percentile(latency, 95)) if rows else None,
        "tokens_per_s": sum(int(r["new_tokens"]) for r in rows) / total_s if total_s > 0 else None,
    }
    if rag:
        out["hit_at_k"] = _mean([float(r["source"] in r["retrieved"]) for r in sourced])
        out["citation_accuracy"] = _mean(
            [float(bool(r["cited"]) and r["cited"][0] == r["source"]) for r in sourced]
        )
        out["abstention"] = _mean([float(r["abstained"]) for r in rows])
    return out


def mode_report(rows: Sequence[dict[str, Any]], mode: str) -> dict[str, Any]:
    """summarize() of a mode's rows, plus the same figures per category (rows without one: 'uncategorized')."""
    rag = mode in RAG_MODES
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("category") or UNCATEGORIZED, []).append(r)
    report = summarize(rows, rag)
    report["by_category"] = {c: summarize(groups[c], rag) for c in sorted(groups)}
    return report
