"""Retrieval per request: the named indexes, and the RAG prompt and sources of a chat request.

A request with `"rag": {"index": NAME, "k": K}` turns its last user message into a question, searches the index
(hybrid, as `phi3fast query`), and is answered with exactly `phi3fast query --model`'s prompt
(phi3fast.rag.answer: build_messages over the passages that fit). The sources go back in an extra response
field; `cited` marks the passages the answer cites as [n].
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from phi3fast.model.chat import chat_prompt_ids
from phi3fast.rag.answer import build_messages, cited, fit_passages

if TYPE_CHECKING:
    from phi3fast.model import Phi3ForCausalLM
    from phi3fast.rag.index import Index, SearchResult

NO_MATCH = "No passage in the index matches this question."  # what `phi3fast query --model` answers then


class Indexes:
    """Named RAG indexes, opened at start. Searches and embeddings of one index run one at a time (its
    embedder and store are not shared across threads)."""

    def __init__(self, paths: dict[str, Path]) -> None:
        from phi3fast.rag import Index

        self._index: dict[str, Index] = {}
        self._locks: dict[str, threading.Lock] = {}
        for name, path in paths.items():
            self._index[name] = Index.open(path)
            self._locks[name] = threading.Lock()

    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def search(self, name: str, question: str, k: int) -> list[SearchResult]:
        with self._locks[name]:
            return self._index[name].search(question, k=k)

    def embed(self, name: str, texts: list[str]) -> tuple[np.ndarray, int]:
        """(vectors [n, dim] float32, tokens counted by the embedder's tokenizer)."""
        with self._locks[name]:
            emb = self._index[name].embedder
            vectors = np.asarray(emb.encode(texts), dtype=np.float32)
            return vectors, sum(emb.count_tokens(t) for t in texts)


def last_user_message(messages: list[dict[str, str]]) -> str | None:
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    return None


def rag_messages(
    model: Phi3ForCausalLM, question: str, results: list[SearchResult], max_new_tokens: int, max_context: int
) -> tuple[list[dict[str, str]], list[SearchResult]]:
    """(query's chat messages, the passages that fit) for a question and its search results.

    fit_passages drops the lowest-ranked passages until prompt + answer fit the model's context; a server run
    with a smaller --max-context drops more, by the same rule, until they fit that."""
    kept = fit_passages(model, question, results, max_new_tokens)
    limit = max_context - max_new_tokens
    while len(kept) > 1 and len(chat_prompt_ids(model, build_messages(question, kept))) > limit:
        kept.pop()
    return build_messages(question, kept), kept


def sources_json(passages: list[SearchResult], answer: str) -> list[dict[str, object]]:
    used = set(cited(answer, len(passages)))
    return [
        {
            "index": i,
            "source": r.source,
            "heading": r.heading,
            "start": r.start,
            "end": r.end,
            "score": r.score,
            "cited": i in used,
            "text": r.text,
        }
        for i, r in enumerate(passages, 1)
    ]
