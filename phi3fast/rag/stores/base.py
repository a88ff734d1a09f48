"""What every chunk store satisfies: an opened store hands out views (read), a writer does one build.

Index (rag/index.py) and the build (rag/build.py) talk only to these interfaces, so the search path, the
fusion (rag/fusion.py) and the JSON are one piece of code whatever holds the chunks: the built-in store
(stores/builtin.py: SQLite + FTS5 + phi3fast.hnsw) or Milvus (stores/milvus/).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from phi3fast.rag.chunking import Chunk

# Columns of the Parquet export, in order; the Milvus collection uses the same names, so the file is its
# bulk-import format (the BM25 sparse column is computed by Milvus from `text`, hence not exported).
EXPORT_COLUMNS = ("id", "vector", "text", "file", "sha256", "source", "heading", "start", "end")


@dataclass(frozen=True)
class ChunkRow:
    id: int
    source: str
    heading: str
    start: int
    end: int
    text: str


@dataclass
class Plan:
    """What a build does: the files to (re-)embed with their chunks, and the files to drop."""

    todo: list[tuple[str, str, list[Chunk]]] = field(default_factory=list)  # (source, sha256, chunks)
    seen: set[str] = field(default_factory=set)  # every source the paths still hold (kept or re-embedded)
    removed: list[str] = field(default_factory=list)  # in the index, no longer under the paths
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    skipped: int = 0


def old_versions(plan: Plan, old: dict[str, str]) -> list[str]:
    """Sources whose current chunks a build drops: files gone from the paths and files that changed."""
    return plan.removed + [s for s, _, _ in plan.todo if s in old]


class Store(Protocol):
    """An opened store: hands out views."""

    def view(self) -> StoreView:
        """A consistent view for one search: the committed build as of now (Milvus: its epoch; built-in: the
        generation MANIFEST.json names now)."""
        ...


class StoreView(Protocol):
    """One consistent view of the chunks for one search (see Index.search)."""

    def count(self) -> int: ...

    def dense(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity) of the k nearest chunks, best first."""
        ...

    def keyword(self, question: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score, higher is better) of the k best keyword matches."""
        ...

    def identifier(self, question: str, k: int) -> list[tuple[int, float]]:
        """Chunks holding the question's code-like words (keywords.identifiers), best first; [] if none."""
        ...

    def rows(self, ids: list[int]) -> dict[int, ChunkRow]: ...

    def export_batches(self, batch_size: int) -> Iterator[dict[str, list]]:
        """Every chunk as columns EXPORT_COLUMNS, a batch at a time."""
        ...


class StoreWriter(Protocol):
    """One build. The build calls: file_hashes, begin, add (once per embedded batch), commit (the atomic
    switch readers see), then cleanup if commit changed something; abort on any failure before commit."""

    def file_hashes(self) -> dict[str, str]: ...

    def begin(self, plan: Plan, old: dict[str, str]) -> None: ...

    def add(self, items: list[tuple[str, str, int, Chunk]], vectors: np.ndarray) -> None:
        """Store chunks (file source, file sha256, ordinal in the file, chunk) with their unit vectors."""
        ...

    def commit(self, plan: Plan, old: dict[str, str]) -> tuple[dict, bool]:
        """Make the build visible; return the manifest fields it sets (generation, store, chunks, sizes) and
        whether anything changed (if not, the current manifest stays)."""
        ...

    def cleanup(self) -> None: ...

    def abort(self) -> None: ...
