"""Shared by tests/test_eval*.py: a tiny Phi-3, a tiny adapter, an index over tests/data/rag/corpus, and question
files made from its labelled questions; plus an independent reading of the metric rules of `phi3fast eval`."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from model_helpers import make_tiny
from rag_helpers import CHUNK_TOKENS, DATA, OVERLAP, QUESTIONS

from phi3fast.lora import LoraConfig, apply_lora, save_adapter
from phi3fast.model import load
from phi3fast.rag import Index

__all__ = ["CHUNK_TOKENS", "DATA", "OVERLAP", "QUESTIONS", "make_tiny"]


def build_index(out: Path) -> Path:
    Index.build([DATA / "corpus"], out, chunk_tokens=CHUNK_TOKENS, overlap=OVERLAP, progress=False)
    return out


class CachedIndex:
    """An open index whose searches are remembered: the tests ask the same questions many times (search is
    deterministic), and the busy test machine makes each one cost."""

    def __init__(self, path: Path) -> None:
        self.index = Index.open(path)
        self.cache: dict[tuple[str, int], list] = {}

    def search(self, question: str, k: int = 5) -> list:
        if (question, k) not in self.cache:
            self.cache[(question, k)] = self.index.search(question, k=k)
        return self.cache[(question, k)]


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A rank-4 adapter with random (non-zero) B, so ft replies differ from base ones."""
    model = load(model_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    save_adapter(model, out)
    return out


def write_questions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def labelled(n: int) -> list[dict]:
    """The first n labelled questions as eval rows: answer = the expected text, category = its kind."""
    return [
        {"question": q["question"], "answer": q["expect"], "source": q["source"], "category": q["kind"]}
        for q in QUESTIONS[:n]
    ]


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.lower()).strip()


def f1(reply: str, answers: list[str]) -> float:
    got = Counter(re.findall(r"\w+", reply.lower()))
    scores = [0.0]
    for a in answers:
        want = Counter(re.findall(r"\w+", a.lower()))
        same = sum(min(got[t], want[t]) for t in want)
        if same:
            p, r = same / sum(got.values()), same / sum(want.values())
            scores.append(2 * p * r / (p + r))
    return max(scores)
