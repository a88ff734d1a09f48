"""An optional cross-encoder reranker: a sentence-transformers CrossEncoder reads the question and each of the
best fused candidates together and scores how well the passage answers it; hybrid search then orders the
candidates by that score.

A bi-encoder (the embedder) compares two vectors made apart; a cross-encoder attends across question and
passage, so it tells "the CP-200's impeller torque" from "the CP-250's" where both vectors sit close. It is
slower (one forward pass per candidate), hence only the top RERANK_DEPTH fused candidates are rescored.

`--reranker` takes any CrossEncoder: a folder, or a hub name (which needs the network unless cached).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from phi3fast.errors import Phi3FastError
from phi3fast.rag.embedders.sentence_transformers import quiet_transformers_progress

BATCH_SIZE = 32


def canonical_reranker_name(name: str) -> str:
    """A folder is recorded by its absolute path, a hub name as given."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


class Reranker:
    """A loaded CrossEncoder. Thread-safe: one lock around the model (as for embedders)."""

    def __init__(self, name: str, device: str | None = None) -> None:
        from sentence_transformers import CrossEncoder

        self.name = canonical_reranker_name(name)
        try:
            with quiet_transformers_progress():
                self.model = CrossEncoder(self.name, device=device)
        except Exception as e:  # a missing folder, no network for a hub name, not a cross-encoder
            msg = " ".join(str(e).split())
            raise Phi3FastError(f"cannot load reranker '{self.name}': {type(e).__name__}: {msg}") from None
        self._lock = threading.Lock()

    def scores(self, question: str, passages: list[str]) -> np.ndarray:
        """One relevance score per passage, higher is better."""
        if not passages:
            return np.zeros(0, np.float32)
        with self._lock:
            s = self.model.predict(
                [(question, p) for p in passages],
                batch_size=BATCH_SIZE,
                show_progress_bar=False,
                convert_to_numpy=True,
            )
        s = np.asarray(s, np.float32)
        if s.ndim == 2:  # a model with several labels: the last one is "relevant" by convention
            s = s[:, -1]
        return s


_SHARED: dict[str, Reranker] = {}
_SHARED_LOCK = threading.Lock()


def shared_reranker(name: str) -> Reranker:
    """One loaded reranker per name per process."""
    name = canonical_reranker_name(name)
    with _SHARED_LOCK:
        if name not in _SHARED:
            _SHARED[name] = Reranker(name)
        return _SHARED[name]
