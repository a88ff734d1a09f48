"""The built-in store: chunks, files and vectors in SQLite, with an FTS5 table for keyword (BM25) search, and
the phi3fast.hnsw graph beside it (vectors.py), one folder per generation.

Generations
-----------
    INDEX_DIR/gen-000007/chunks.sqlite   files, chunks (+ their vectors), the FTS5 table
    INDEX_DIR/gen-000007/vectors.hnsw    the phi3fast.hnsw graph, labels = chunk ids

Atomic commit: a build copies the current generation into `gen-NNNNNN.<pid>-<ns>.tmp`, applies the changes
there, saves, fsyncs, renames the folder, then the index layer replaces MANIFEST.json (temp file + os.replace).
Until that last step every reader and every later run sees the previous generation whole, so a crash or Ctrl-C
mid-run loses nothing; the stale .tmp folder is removed by the next build. The previous generation is kept one
more round so a reader that read the old manifest a moment ago can still open its files.

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

import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from phi3fast.errors import Phi3FastError
from phi3fast.rag.backend import EXPORT_COLUMNS, ChunkRow, Plan, fsync, old_versions
from phi3fast.rag.chunking import Chunk
from phi3fast.rag.vectors import VectorStore

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
# Lowercase, accents folded, English words stemmed ("rattling" and "rattle" are both "rattl"), split at
# non-alphanumerics ("XR-7731" is xr 7731). The Milvus store feeds its BM25 the text tokenized by this same
# tokenizer (fts_tokens), so both stores match the same words.
TOKENIZER = "porter unicode61 remove_diacritics 2"
_tokenizer_db = threading.local()

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


def fts_tokens(texts: list[str]) -> list[list[str]]:
    """Each text's tokens, in order, as the FTS5 table indexes them (via an in-memory FTS5 table and its
    fts5vocab 'instance' view; about 20 us per sentence)."""
    db = getattr(_tokenizer_db, "db", None)
    if db is None:
        db = sqlite3.connect(":memory:")
        db.execute(f"CREATE VIRTUAL TABLE t USING fts5(x, tokenize='{TOKENIZER}')")
        db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        _tokenizer_db.db = db
    out: list[list[str]] = [[] for _ in texts]
    with db:
        db.executemany("INSERT INTO t(rowid, x) VALUES (?, ?)", enumerate(texts))
        for term, doc in db.execute("SELECT term, doc FROM v ORDER BY doc, offset"):
            out[doc].append(term)
        db.execute("DELETE FROM t")
    return out


def _quote(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def query_terms(question: str) -> list[str]:
    """The words of a question worth searching for: stopwords dropped, each word once."""
    terms: list[str] = []
    for w in _WORD.findall(question):
        if w.lower() in _STOPWORDS or w in terms:
            continue
        terms.append(w)
    return terms


def fts_query(question: str) -> str | None:
    """A safe FTS5 MATCH expression for free text: quoted terms OR-ed together; None if nothing searchable."""
    terms = query_terms(question)
    if not terms:
        return None
    return " OR ".join(_quote(t) for t in terms)


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

    def export_batches(self, batch_size: int) -> Iterator[dict[str, list]]:
        """Every chunk as EXPORT_COLUMNS, in id order, batch_size rows at a time."""
        cur = self.db.execute(
            "SELECT c.id, c.vector, c.text, c.file, f.sha256, c.source, c.heading, c.start, c.end "
            "FROM chunks c JOIN files f ON f.source = c.file ORDER BY c.id"
        )
        while rows := cur.fetchmany(batch_size):
            cols = {name: [r[i] for r in rows] for i, name in enumerate(EXPORT_COLUMNS)}
            cols["vector"] = [np.frombuffer(v, np.float32).tolist() for v in cols["vector"]]
            yield cols


DB_FILE = "chunks.sqlite"
VEC_FILE = "vectors.hnsw"


class BuiltinBackend:
    """An opened generation. Thread-safe for searches: one read-only SQLite connection per thread; the graph
    is shared (phi3fast.hnsw searches are read-only)."""

    def __init__(self, gen_dir: Path, chunks: int, dim: int) -> None:
        self.gen_dir = gen_dir
        self.chunks = chunks
        self._local = threading.local()
        self.store()  # open and check in the calling thread, so a corrupt database fails open(), not search()
        self.vectors = VectorStore.load(gen_dir / VEC_FILE, dim)
        if len(self.vectors) < chunks:
            raise Phi3FastError(f"{gen_dir / VEC_FILE}: fewer vectors than chunks (corrupt index)")

    @classmethod
    def open(cls, gen_dir: Path, manifest: dict) -> BuiltinBackend:
        for name, size in manifest["sizes"].items():
            f = gen_dir / name
            if not f.is_file():
                raise Phi3FastError(f"{f}: missing (corrupt index; rebuild it with `phi3fast index`)")
            if f.stat().st_size != int(size):
                raise Phi3FastError(
                    f"{f}: {f.stat().st_size} bytes, the manifest says {size} (truncated or corrupt index)"
                )
        return cls(gen_dir, int(manifest["chunks"]), int(manifest["embedder"]["dim"]))

    def store(self) -> Store:
        store = getattr(self._local, "store", None)
        if store is None:
            db = self.gen_dir / DB_FILE
            try:
                store = Store(db, readonly=True)
                store.check()
                count = store.count()
            except sqlite3.DatabaseError as e:
                raise Phi3FastError(f"{db}: corrupt chunk database ({e})") from None
            if count != self.chunks:
                raise Phi3FastError(f"{db}: {count} chunks, the manifest says {self.chunks} (corrupt)")
            self._local.store = store
        return store

    # -- the Reader interface (this object is its own view: each thread has its own connection) --
    def view(self) -> BuiltinBackend:
        return self

    def count(self) -> int:
        return self.chunks

    def dense(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        ids, sims = self.vectors.search(vector, min(k, self.chunks))
        return list(zip(ids.tolist(), sims.tolist(), strict=True))

    def keyword(self, question: str, k: int) -> list[tuple[int, float]]:
        return self.store().keyword_search(question, k)

    def identifier(self, question: str, k: int) -> list[tuple[int, float]]:
        return self.store().identifier_search(question, k)

    def rows(self, ids: list[int]) -> dict[int, ChunkRow]:
        return self.store().chunks(ids)

    def export_batches(self, batch_size: int) -> Iterator[dict[str, list]]:
        return self.store().export_batches(batch_size)


def _next_generation(prev: dict | None) -> str:
    n = int(prev["generation"].split("-")[1]) + 1 if prev else 1
    return f"gen-{n:06d}"


class BuiltinWriter:
    """One build of a new generation folder (see "Generations" above)."""

    def __init__(self, out: Path, prev: dict | None, fresh: bool, dim: int) -> None:
        self.out, self.prev, self.fresh, self.dim = out, prev, fresh, dim
        self.gen = _next_generation(prev)
        # Left by an interrupted run (a .tmp folder, or a renamed one whose manifest switch never happened):
        # we hold the lock and no manifest points there, so nobody reads them.
        for stale in out.glob("gen-*"):
            if stale.name.endswith(".tmp") or stale.name >= self.gen:
                shutil.rmtree(stale, ignore_errors=True)
        # A name of its own per run: a connection of a crashed run that is closed late must never touch our files.
        self.tmp = out / f"{self.gen}.{os.getpid()}-{time.monotonic_ns()}.tmp"
        self.tmp.mkdir()
        self.store: Store | None = None
        try:
            self.store = Store(self.tmp / DB_FILE)
            if fresh:
                self.vectors = VectorStore.create(dim)
            else:
                prev_dir = out / prev["generation"]
                src = sqlite3.connect(f"file:{prev_dir / DB_FILE}?mode=ro", uri=True)
                try:
                    src.backup(self.store.db)
                except sqlite3.DatabaseError as e:
                    raise Phi3FastError(f"{prev_dir / DB_FILE}: corrupt chunk database ({e})") from None
                finally:
                    src.close()
                self.vectors = VectorStore.load(prev_dir / VEC_FILE, dim)
            self.store.begin()
        except BaseException:
            self.abort()
            raise

    def file_hashes(self) -> dict[str, str]:
        return self.store.file_hashes()

    def begin(self, plan: Plan, old: dict[str, str]) -> None:
        # Inside the transaction: a changed file's old chunks go before its new ones come.
        for source in old_versions(plan, old):
            self.vectors.delete(self.store.remove_file(source))

    def add(self, items: list[tuple[str, str, int, Chunk]], vectors: np.ndarray) -> None:
        ids = []
        for (file, _, _, c), v in zip(items, vectors, strict=True):
            ids += self.store.add_chunks(file, [(c.source, c.heading, c.start, c.end, c.text)], v[None])
        self.vectors.add(vectors, np.array(ids, np.int64))

    def commit(self, plan: Plan, old: dict[str, str]) -> tuple[dict, bool]:
        store = self.store
        for source, sha, chunks in plan.todo:
            store.set_file(source, sha, len(chunks))
        total = store.count()
        if len(self.vectors) > 2 * total:
            # More deleted labels than live ones: rebuild the graph from the stored vectors (no re-embedding).
            ids, vecs = store.all_vectors(self.dim)
            self.vectors = VectorStore.create(self.dim, capacity=len(ids))
            self.vectors.add(vecs, ids)
        store.commit()
        store.close()
        if self.prev is not None and not self.fresh and not plan.todo and not plan.removed:
            shutil.rmtree(self.tmp)  # nothing changed: keep the current generation
            return {"chunks": total}, False
        self.vectors.save(self.tmp / VEC_FILE)
        for f in (DB_FILE, VEC_FILE):
            fsync(self.tmp / f)
        final = self.out / self.gen
        os.rename(self.tmp, final)
        fields = {
            "generation": self.gen,
            "store": {"kind": "builtin"},
            "chunks": total,
            "sizes": {f: (final / f).stat().st_size for f in (DB_FILE, VEC_FILE)},
        }
        return fields, True

    def cleanup(self) -> None:
        keep = {self.gen, self.prev["generation"] if self.prev else self.gen}
        for old_gen in self.out.glob("gen-*"):
            if old_gen.name not in keep and not old_gen.name.endswith(".tmp"):
                shutil.rmtree(old_gen, ignore_errors=True)

    def abort(self) -> None:
        if self.store is not None:  # roll back and close before deleting the files under it
            self.store.rollback()
            self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
