"""Chunks, files and vectors in SQLite, with an FTS5 table for keyword (BM25) search.

FTS5 and jargon
---------------
The FTS5 tokenizer is `porter unicode61`: it splits "XR-7731" into the tokens xr, 7731 and "E-042" into e, 042.
User text never reaches FTS5 as syntax: every word is turned into a quoted FTS5 string, which FTS5 tokenizes
the same way, so "XR-7731" becomes the *phrase* xr 7731 (adjacent tokens in that order): an exact match for the
part number that also matches "XR 7731", and that an FTS5 syntax error cannot come from (quotes, parentheses,
AND/NEAR/* in a question are just text). Words are OR-ed and BM25 ranks by how rare the matched ones are, so
a rare fault code dominates the common words around it.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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

# Common English words carry no signal for BM25 and only slow the OR query down.
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i if in is it of on or my our should the this to "
    "was we what when where which who why will with you your".split()
)
_WORD = re.compile(r"\w+(?:[-./:]\w+)*")


def identifiers(question: str) -> list[str]:
    """Code-like words of the question: part numbers, fault codes, versions (XR-7731, E-042, CR2032, 4.2.1).

    A word with a digit and a letter or separator; plain numbers ("24 volts") and words are not identifiers.
    """
    out: list[str] = []
    for w in _WORD.findall(question):
        if any(c.isdigit() for c in w) and any(c.isalpha() or c in "-./:" for c in w) and w not in out:
            out.append(w)
    return out


def _quote(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def fts_query(question: str) -> str | None:
    """A safe FTS5 MATCH expression for free text: quoted terms OR-ed together; None if nothing searchable."""
    terms: list[str] = []
    for w in _WORD.findall(question):
        if w.lower() in _STOPWORDS or w in terms:
            continue
        terms.append(w)
    if not terms:
        return None
    return " OR ".join(_quote(t) for t in terms)


@dataclass(frozen=True)
class ChunkRow:
    id: int
    source: str
    heading: str
    start: int
    end: int
    text: str


class Store:
    """One SQLite connection (use one per thread; the index layer keeps them in a threading.local)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        # check_same_thread stays on: each thread must open its own Store.
        self.db = sqlite3.connect(uri, uri=True, isolation_level=None)
        if not readonly:
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def check(self) -> None:
        """Raise sqlite3.DatabaseError unless this is a phi3fast chunk database (cheap: schema only)."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        names = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master")}
        if version != SCHEMA_VERSION or not {"files", "chunks", "chunks_fts"} <= names:
            raise sqlite3.DatabaseError(f"not a phi3fast chunk database (schema version {version})")

    # -- writes (inside a transaction the caller opens with begin()/commit()) --
    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.ProgrammingError:  # already closed: nothing to roll back
            pass

    def file_hashes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT source, sha256 FROM files"))

    def remove_file(self, source: str) -> list[int]:
        """Delete a file's chunks (and their FTS rows); return the deleted chunk ids."""
        rows = self.db.execute(
            "SELECT id, heading, source, text FROM chunks WHERE file = ?", (source,)
        ).fetchall()
        # External-content FTS5: a row is removed by the special 'delete' insert with its old values.
        self.db.executemany(
            "INSERT INTO chunks_fts(chunks_fts, rowid, text, heading, source) VALUES('delete', ?, ?, ?, ?)",
            [(r[0], r[3], r[1], r[2]) for r in rows],
        )
        self.db.execute("DELETE FROM chunks WHERE file = ?", (source,))
        self.db.execute("DELETE FROM files WHERE source = ?", (source,))
        return [r[0] for r in rows]

    def set_file(self, source: str, sha256: str, n_chunks: int) -> None:
        self.db.execute(
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
            cur = self.db.execute(
                "INSERT INTO chunks(file, source, heading, start, end, text, vector) VALUES(?, ?, ?, ?, ?, ?, ?)",
                (file, source, heading, start, end, text, np.asarray(vec, np.float32).tobytes()),
            )
            ids.append(cur.lastrowid)
            self.db.execute(
                "INSERT INTO chunks_fts(rowid, text, heading, source) VALUES(?, ?, ?, ?)",
                (cur.lastrowid, text, heading, source),
            )
        return ids

    # -- reads --
    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def all_vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every chunk, for rebuilding the graph."""
        rows = self.db.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], np.int64)
        vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), dim)
        return ids, vecs

    def chunks(self, ids: list[int]) -> dict[int, ChunkRow]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f"SELECT id, source, heading, start, end, text FROM chunks WHERE id IN ({marks})",
            [int(i) for i in ids],
        )
        return {r[0]: ChunkRow(*r) for r in rows}

    def keyword_search(self, question: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score, higher is better) of the k best keyword matches."""
        return self._bm25(fts_query(question), k)

    def identifier_search(self, question: str, k: int) -> list[tuple[int, float]]:
        """Chunks holding every identifier of the question (or, if none holds all, any of them), by BM25."""
        ids = identifiers(question)
        if not ids:
            return []
        return self._bm25(" AND ".join(map(_quote, ids)), k) or self._bm25(" OR ".join(map(_quote, ids)), k)

    def _bm25(self, match: str | None, k: int) -> list[tuple[int, float]]:
        if match is None or k <= 0:
            return []
        # bm25() is lower-is-better; column weights: a hit in a heading or file name says more than one in text.
        rows = self.db.execute(
            "SELECT rowid, bm25(chunks_fts, 1.0, 2.0, 0.5) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
            "ORDER BY s LIMIT ?",
            (match, k),
        ).fetchall()
        return [(r[0], -float(r[1])) for r in rows]
