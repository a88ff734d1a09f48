"""The built-in store's chunk database: files, chunks (with their vectors) and an FTS5 table, in one SQLite file.

One connection per thread (ChunkDB); the generation that holds the file is stores/builtin.py's.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from phi3fast.rag.stores.base import EXPORT_COLUMNS, ChunkRow
from phi3fast.rag.stores.keywords import fts_query, identifier_queries

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  source TEXT PRIMARY KEY,   -- path relative to the root given
  sha256 TEXT NOT NULL,      -- content hash: unchanged files are skipped on re-index
  n_chunks INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
  id INTEGER PRIMARY KEY AUTOINCREMENT,  -- also the vector label; AUTOINCREMENT never reuses a deleted id
  file TEXT NOT NULL REFERENCES files(source),
  source TEXT NOT NULL,      -- file source, or "file#id" / the record's own source for JSONL records
  heading TEXT NOT NULL,
  start INTEGER NOT NULL,
  end INTEGER NOT NULL,
  text TEXT NOT NULL,
  vector BLOB NOT NULL       -- float32[dim], kept so the graph can be rebuilt without re-embedding
);
CREATE INDEX IF NOT EXISTS chunks_file ON chunks(file);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
  text, heading, source, content='chunks', content_rowid='id',
  tokenize='porter unicode61 remove_diacritics 2'
);
"""


def sqlite_uri(path: Path, *, readonly: bool) -> str:
    """A SQLite file URI for any path. Everything but '/' and unreserved characters is percent-encoded: in a
    URI, '?' starts the parameters, '#' a fragment and '%' an escape, so a folder named 'a?b' or '50%' would
    otherwise open another file."""
    uri = "file:" + urllib.parse.quote(str(Path(path).absolute()), safe="/")
    return uri + "?mode=ro" if readonly else uri


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    # check_same_thread off: a connection is used by one thread at a time (the store keeps one per thread), but
    # the generation closes all of them from whichever thread lets it go.
    return sqlite3.connect(
        sqlite_uri(path, readonly=readonly), uri=True, isolation_level=None, check_same_thread=False
    )


class ChunkDB:
    """One SQLite connection (use one per thread)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.conn = connect(path, readonly=readonly)
        if not readonly:
            self.conn.executescript(_SCHEMA)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    def check(self) -> None:
        """Raise sqlite3.DatabaseError unless this is a phi3fast chunk database (cheap: schema only)."""
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        names = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master")}
        if version != SCHEMA_VERSION or not {"files", "chunks", "chunks_fts"} <= names:
            raise sqlite3.DatabaseError(f"not a phi3fast chunk database (schema version {version})")

    # -- writes (inside a transaction the caller opens with begin()/commit()) --
    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.ProgrammingError:  # already closed: nothing to roll back
            pass

    def file_hashes(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT source, sha256 FROM files"))

    def remove_file(self, source: str) -> list[int]:
        """Delete a file's chunks (and their FTS rows); return the deleted chunk ids."""
        rows = self.conn.execute(
            "SELECT id, heading, source, text FROM chunks WHERE file = ?", (source,)
        ).fetchall()
        # External-content FTS5: a row is removed by the special 'delete' insert with its old values.
        self.conn.executemany(
            "INSERT INTO chunks_fts(chunks_fts, rowid, text, heading, source) VALUES('delete', ?, ?, ?, ?)",
            [(r[0], r[3], r[1], r[2]) for r in rows],
        )
        self.conn.execute("DELETE FROM chunks WHERE file = ?", (source,))
        self.conn.execute("DELETE FROM files WHERE source = ?", (source,))
        return [r[0] for r in rows]

    def set_file(self, source: str, sha256: str, n_chunks: int) -> None:
        self.conn.execute(
            "INSERT INTO files(source, sha256, n_chunks) VALUES(?, ?, ?) "
            "ON CONFLICT(source) DO UPDATE SET sha256 = excluded.sha256, n_chunks = excluded.n_chunks",
            (source, sha256, n_chunks),
        )

    def add_chunks(
        self, file: str, rows: Iterable[tuple[str, str, int, int, str]], vectors: np.ndarray
    ) -> list[int]:
        """Insert (source, heading, start, end, text) rows with their vectors; return the new chunk ids."""
        ids = []
        for (source, heading, start, end, text), vec in zip(rows, vectors, strict=True):
            cur = self.conn.execute(
                "INSERT INTO chunks(file, source, heading, start, end, text, vector) VALUES(?, ?, ?, ?, ?, ?, ?)",
                (file, source, heading, start, end, text, np.asarray(vec, np.float32).tobytes()),
            )
            ids.append(cur.lastrowid)
            self.conn.execute(
                "INSERT INTO chunks_fts(rowid, text, heading, source) VALUES(?, ?, ?, ?)",
                (cur.lastrowid, text, heading, source),
            )
        return ids

    # -- reads --
    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def all_vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every chunk, for rebuilding the graph."""
        rows = self.conn.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], np.int64)
        vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), dim)
        return ids, vecs

    def chunks(self, ids: list[int]) -> dict[int, ChunkRow]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(
            f"SELECT id, source, heading, start, end, text FROM chunks WHERE id IN ({marks})",
            [int(i) for i in ids],
        )
        return {r[0]: ChunkRow(*r) for r in rows}

    def keyword_search(self, question: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score, higher is better) of the k best keyword matches."""
        return self._bm25(fts_query(question), k)

    def identifier_search(self, question: str, k: int) -> list[tuple[int, float]]:
        """Chunks holding every identifier of the question (or, if none holds all, any of them), by BM25."""
        for match in identifier_queries(question):
            hits = self._bm25(match, k)
            if hits:
                return hits
        return []

    def _bm25(self, match: str | None, k: int) -> list[tuple[int, float]]:
        if match is None or k <= 0:
            return []
        # bm25() is lower-is-better; column weights: a hit in a heading or file name says more than one in text.
        rows = self.conn.execute(
            "SELECT rowid, bm25(chunks_fts, 1.0, 2.0, 0.5) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
            "ORDER BY s LIMIT ?",
            (match, k),
        ).fetchall()
        return [(r[0], -float(r[1])) for r in rows]

    def export_batches(self, batch_size: int) -> Iterator[dict[str, list]]:
        """Every chunk as EXPORT_COLUMNS, in id order, batch_size rows at a time."""
        cur = self.conn.execute(
            "SELECT c.id, c.vector, c.text, c.file, f.sha256, c.source, c.heading, c.start, c.end "
            "FROM chunks c JOIN files f ON f.source = c.file ORDER BY c.id"
        )
        while rows := cur.fetchmany(batch_size):
            cols = {name: [r[i] for r in rows] for i, name in enumerate(EXPORT_COLUMNS)}
            cols["vector"] = [np.frombuffer(v, np.float32).tolist() for v in cols["vector"]]
            yield cols
