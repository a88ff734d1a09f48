"""What every chunk store shares: the manifest, the change plan of a build, and the two small interfaces
(a reader for searches, a writer for builds) that the built-in store (store.py) and Milvus (milvus.py) satisfy.

Index (index.py) talks only to these interfaces, so the search path, the reciprocal rank fusion and the JSON are
one piece of code whatever holds the chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from phi3fast.errors import Phi3FastError
from phi3fast.rag.chunking import Chunk, chunk_document
from phi3fast.rag.readers import SkipFile, iter_files, read_documents

FORMAT = "phi3fast-rag-index"
VERSION = 1
MANIFEST = "MANIFEST.json"
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


# -- the manifest ---------------------------------------------------------------------------------------------


def read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Phi3FastError(f"{path}: corrupt index manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise Phi3FastError(f"{path}: not a phi3fast RAG index manifest")
    if m.get("version") != VERSION:
        raise Phi3FastError(f"{path}: index format version {m.get('version')}, this phi3fast reads {VERSION}")
    try:
        int(m["embedder"]["dim"]), str(m["generation"]), int(m["chunks"]), dict(m["sizes"])
        if not isinstance(
            m.setdefault("store", {"kind": "builtin"}), dict
        ):  # written before stores had kinds
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise Phi3FastError(f"{path}: corrupt index manifest (missing fields)") from None
    return m


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(out: Path, manifest: dict) -> None:
    """Atomically: readers see the old manifest or the new one, never a mix."""
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    fsync(tmp)
    os.replace(tmp, out / MANIFEST)
    fsync(out)


# -- the change plan of a build ----------------------------------------------------------------------------------


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


def plan_changes(
    roots: list[Path],
    old: dict[str, str],
    token_offsets: Callable,
    count_tokens: Callable[[str], int],
    max_seq_length: int,
    config: dict,
    warn: Callable[[str], None],
) -> Plan:
    """Scan the paths; compare each file's content hash with `old` ({source: sha256} of the index)."""
    plan = Plan()

    def budget(heading: str) -> int:
        room = max_seq_length - 2 - (count_tokens(heading) + 1 if heading else 0)
        return max(config["overlap"] + 8, min(config["chunk_tokens"], room))

    for path, source in iter_files(roots):
        try:
            data = path.read_bytes()
        except OSError as e:  # permissions, a file removed mid-run: skip it like any unusable file
            warn(f"{path}: skipped: unreadable ({e.strerror or e})")
            plan.skipped += 1
            continue
        # Which files changed: content hash, not mtime (a copy or checkout touches mtimes of unchanged files).
        sha = hashlib.sha256(data).hexdigest()
        if old.get(source) == sha:
            plan.seen.add(source)
            plan.unchanged += 1
            continue
        try:
            docs = read_documents(path, source)
        except SkipFile as e:
            warn(f"{path}: skipped: {e}")
            plan.skipped += 1
            continue
        chunks = [c for d in docs for c in chunk_document(d, token_offsets, budget, config["overlap"])]
        if not chunks:
            warn(f"{path}: skipped: no text to index")
            plan.skipped += 1
            continue
        plan.seen.add(source)
        plan.todo.append((source, sha, chunks))
        plan.changed += source in old
        plan.added += source not in old
    plan.removed = [s for s in old if s not in plan.seen]
    return plan


def old_versions(plan: Plan, old: dict[str, str]) -> list[str]:
    """Sources whose current chunks a build drops: files gone from the paths and files that changed."""
    return plan.removed + [s for s, _, _ in plan.todo if s in old]


# -- the interfaces --------------------------------------------------------------------------------------------


class Backend(Protocol):
    """An opened store: hands out readers."""

    def view(self) -> Reader:
        """A consistent view for one search (Milvus: pinned to the committed build; built-in: this thread's)."""
        ...


class Reader(Protocol):
    """One consistent view of the chunks for one search (see Index.search)."""

    def count(self) -> int: ...

    def dense(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity) of the k nearest chunks, best first."""
        ...

    def keyword(self, question: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score, higher is better) of the k best keyword matches."""
        ...

    def identifier(self, question: str, k: int) -> list[tuple[int, float]]:
        """Chunks holding the question's code-like words (store.identifiers), best first; [] if it has none."""
        ...

    def rows(self, ids: list[int]) -> dict[int, ChunkRow]: ...

    def export_batches(self, batch_size: int) -> Iterator[dict[str, list]]:
        """Every chunk as columns EXPORT_COLUMNS, a batch at a time."""
        ...


class Writer(Protocol):
    """One build. The index layer calls: file_hashes, begin, add (once per embedded batch), commit (the atomic
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
