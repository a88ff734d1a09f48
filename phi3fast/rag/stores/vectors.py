"""The vector store: every call into phi3fast.hnsw lives here, so the rest of rag/ never sees the engine.

Labels are SQLite chunk ids. Deleting a chunk marks its label deleted (searches skip it); when deleted labels
outnumber live ones the index layer rebuilds the graph from the vectors kept in SQLite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from phi3fast.errors import Phi3FastError

M = 16  # graph degree: hnswlib's default, a good recall/memory balance for 384-dim sentence vectors
EF_CONSTRUCTION = 200
EF_SEARCH = 128  # >= the candidate depth hybrid search asks for, so recall stays high at k <= 100


def _engine():
    from phi3fast import hnsw

    return hnsw


class VectorStore:
    """Cosine HNSW over unit vectors; labels are chunk ids."""

    def __init__(self, index: object, dim: int) -> None:
        self._index = index
        self.dim = dim

    @classmethod
    def create(cls, dim: int, capacity: int = 1024) -> VectorStore:
        index = _engine().Index("cosine", dim)
        index.init_index(
            max_elements=max(capacity, 16), M=M, ef_construction=EF_CONSTRUCTION, random_seed=100
        )
        index.set_ef(EF_SEARCH)
        return cls(index, dim)

    @classmethod
    def load(cls, path: Path, dim: int) -> VectorStore:
        index = _engine().Index("cosine", dim)
        try:
            index.load_index(str(path))
        except Exception as e:  # the engine raises RuntimeError on bad magic, size or checksum
            raise Phi3FastError(f"{path}: corrupt or truncated vector index ({e})") from None
        if int(index.dim) != dim:
            raise Phi3FastError(
                f"{path}: vector index has dimension {index.dim}, the index manifest says {dim}"
            )
        index.set_ef(EF_SEARCH)
        return cls(index, dim)

    def __len__(self) -> int:
        """Labels stored, deleted ones included."""
        return int(self._index.get_current_count())

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        need = len(self) + len(ids)
        if need > self._index.get_max_elements():
            self._index.resize_index(max(need, 2 * self._index.get_max_elements()))
        self._index.add_items(np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64))

    def delete(self, ids: list[int]) -> None:
        for i in ids:
            self._index.mark_deleted(int(i))

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosine similarities) of the k nearest live vectors, best first. k <= the live count."""
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        labels, dists = self._index.knn_query(np.ascontiguousarray(query, np.float32).reshape(1, -1), k=k)
        return labels[0].astype(np.int64), (1.0 - dists[0]).astype(np.float32)

    def save(self, path: Path) -> None:
        self._index.save_index(str(path))
