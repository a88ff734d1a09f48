"""The built-in store: chunks, files and vectors in SQLite (sqlite.py) with an FTS5 table for keyword (BM25)
search, and the phi3fast.hnsw graph beside it (vectors.py), one folder per generation.

Generations
-----------
    INDEX_DIR/gen-000007/chunks.sqlite   files, chunks (+ their vectors), the FTS5 table
    INDEX_DIR/gen-000007/vectors.hnsw    the phi3fast.hnsw graph, labels = chunk ids

Atomic commit: a build copies the current generation into `gen-NNNNNN.<pid>-<ns>.tmp`, applies the changes
there, saves, fsyncs, renames the folder, then the build replaces MANIFEST.json (temp file + os.replace).
Until that last step every reader and every later run sees the previous generation whole, so a crash or Ctrl-C
mid-run loses nothing; the stale .tmp folder is removed by the next build.

Note: readers across rebuilds
-----------------------------
A server holds an index open for days while `phi3fast index` rebuilds it. So an opened store follows the
manifest: each view() compares MANIFEST.json's inode and mtime with the ones it opened (one stat), and on a
change opens the new generation; searches already running finish on the one they started with. A reader also
holds a shared flock on the folder of every generation it has open, and a build deletes an old generation only
if it can take that lock exclusively (else a later build does): a view, and any thread's first connection to
it, never finds its files gone.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from phi3fast._utils import fsync
from phi3fast.errors import Phi3FastError
from phi3fast.rag.chunking import Chunk
from phi3fast.rag.manifest import MANIFEST, read_manifest
from phi3fast.rag.stores.base import ChunkRow, Plan, old_versions
from phi3fast.rag.stores.sqlite import ChunkDB, connect
from phi3fast.rag.stores.vectors import VectorStore

DB_FILE = "chunks.sqlite"
VEC_FILE = "vectors.hnsw"
_OPEN_ATTEMPTS = 3  # a generation can vanish between reading the manifest and pinning it: read it again


class _Vanished(Exception):
    """The generation folder was deleted (or is being deleted) before this reader pinned it."""


def _pin(gen_dir: Path) -> int:
    """A shared flock on the generation folder, held while it is open (see "Note: readers across rebuilds")."""
    try:
        fd = os.open(gen_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise _Vanished from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # a build holds it exclusively: it is deleting this folder
        os.close(fd)
        raise _Vanished from None
    return fd


def _release(dbs: list[ChunkDB], fd: int) -> None:
    for db in dbs:
        db.close()
    os.close(fd)  # drops the shared flock


def _remove_unpinned(gen_dir: Path) -> None:
    """Delete an old generation unless a reader holds it."""
    try:
        fd = os.open(gen_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # pinned by a reader: a later build removes it
        shutil.rmtree(gen_dir, ignore_errors=True)
    finally:
        os.close(fd)


class Generation:
    """An opened generation: the StoreView of the built-in store. Thread-safe for searches: one read-only
    SQLite connection per thread; the graph is shared (phi3fast.hnsw searches are read-only)."""

    def __init__(self, gen_dir: Path, manifest: dict) -> None:
        self.gen_dir = gen_dir
        self.manifest = manifest
        self.chunks = int(manifest["chunks"])
        fd = _pin(gen_dir)
        self._local = threading.local()
        self._dbs: list[ChunkDB] = []
        self._dbs_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _release, self._dbs, fd)
        for name, size in manifest["sizes"].items():
            f = gen_dir / name
            if not f.is_file():
                raise Phi3FastError(f"{f}: missing (corrupt index; rebuild it with `phi3fast index`)")
            if f.stat().st_size != int(size):
                raise Phi3FastError(
                    f"{f}: {f.stat().st_size} bytes, the manifest says {size} (truncated or corrupt index)"
                )
        self.db()  # open and check in the calling thread, so a corrupt database fails open(), not search()
        self.vectors = VectorStore.load(gen_dir / VEC_FILE, int(manifest["embedder"]["dim"]))
        if len(self.vectors) < self.chunks:
            raise Phi3FastError(f"{gen_dir / VEC_FILE}: fewer vectors than chunks (corrupt index)")

    def close(self) -> None:
        self._finalizer()

    def db(self) -> ChunkDB:
        """This thread's connection."""
        db = getattr(self._local, "db", None)
        if db is None:
            path = self.gen_dir / DB_FILE
            try:
                db = ChunkDB(path, readonly=True)
            except sqlite3.DatabaseError as e:
                raise Phi3FastError(f"{path}: corrupt chunk database ({e})") from None
            with self._dbs_lock:
                self._dbs.append(db)
            try:
                db.check()
                count = db.count()
            except sqlite3.DatabaseError as e:
                raise Phi3FastError(f"{path}: corrupt chunk database ({e})") from None
            if count != self.chunks:
                raise Phi3FastError(f"{path}: {count} chunks, the manifest says {self.chunks} (corrupt)")
            self._local.db = db
        return db

    # -- the StoreView interface --
    def count(self) -> int:
        return self.chunks

    def dense(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        ids, sims = self.vectors.search(vector, min(k, self.chunks))
        return list(zip(ids.tolist(), sims.tolist(), strict=True))

    def keyword(self, question: str, k: int) -> list[tuple[int, float]]:
        return self.db().keyword_search(question, k)

    def identifier(self, question: str, k: int) -> list[tuple[int, float]]:
        return self.db().identifier_search(question, k)

    def rows(self, ids: list[int]) -> dict[int, ChunkRow]:
        return self.db().chunks(ids)

    def export_batches(self, batch_size: int) -> Iterator[dict[str, list]]:
        return self.db().export_batches(batch_size)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Which manifest file this is: os.replace gives a new inode, a rewrite a new mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _same_vectors(a: dict, b: dict) -> bool:
    return all(a["embedder"].get(k) == b["embedder"].get(k) for k in ("name", "dim"))


class BuiltinStore:
    """An opened built-in index: the Store that follows the manifest (see "Note: readers across rebuilds")."""

    def __init__(self, index_dir: Path, manifest: dict) -> None:
        self.index_dir = index_dir
        self._lock = threading.Lock()
        self._stamp = _stamp(index_dir / MANIFEST)
        self._gen = self._open(manifest)

    def _open(self, manifest: dict) -> Generation:
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                return Generation(self.index_dir / manifest["generation"], manifest)
            except _Vanished:
                newer = read_manifest(self.index_dir)
                if newer["generation"] == manifest["generation"] or attempt == _OPEN_ATTEMPTS - 1:
                    where = self.index_dir / manifest["generation"]
                    raise Phi3FastError(
                        f"{where}: missing (corrupt index; rebuild it with `phi3fast index`)"
                    ) from None
                self._stamp = _stamp(self.index_dir / MANIFEST)
                manifest = newer
        raise AssertionError("unreachable")

    @property
    def manifest(self) -> dict:
        return self._gen.manifest

    def close(self) -> None:
        """Close the current generation now (else it closes when the last search holding it lets it go)."""
        self._gen.close()

    def view(self) -> Generation:
        stamp = _stamp(self.index_dir / MANIFEST)
        if stamp is not None and stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._follow(stamp)
        return self._gen

    def _follow(self, stamp: tuple[int, int, int]) -> None:
        current = self._gen.manifest
        manifest = read_manifest(self.index_dir)
        self._stamp = stamp
        if manifest["generation"] == current["generation"]:
            return
        if manifest["store"].get("kind") != "builtin" or not _same_vectors(manifest, current):
            raise Phi3FastError(
                f"{self.index_dir}: rebuilt with embedder '{manifest['embedder']['name']}' since it was opened "
                f"with '{current['embedder']['name']}'; open it again"
            )
        # The old generation closes once the searches still holding it finish (its finalizer).
        self._gen = self._open(manifest)


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
        self.db: ChunkDB | None = None
        try:
            self.db = ChunkDB(self.tmp / DB_FILE)
            if fresh:
                self.vectors = VectorStore.create(dim)
            else:
                prev_dir = out / prev["generation"]
                src = connect(prev_dir / DB_FILE, readonly=True)
                try:
                    src.backup(self.db.conn)
                except sqlite3.DatabaseError as e:
                    raise Phi3FastError(f"{prev_dir / DB_FILE}: corrupt chunk database ({e})") from None
                finally:
                    src.close()
                self.vectors = VectorStore.load(prev_dir / VEC_FILE, dim)
            self.db.begin()
        except BaseException:
            self.abort()
            raise

    def file_hashes(self) -> dict[str, str]:
        return self.db.file_hashes()

    def begin(self, plan: Plan, old: dict[str, str]) -> None:
        # Inside the transaction: a changed file's old chunks go before its new ones come.
        for source in old_versions(plan, old):
            self.vectors.delete(self.db.remove_file(source))

    def add(self, items: list[tuple[str, str, int, Chunk]], vectors: np.ndarray) -> None:
        ids = []
        for (file, _, _, c), v in zip(items, vectors, strict=True):
            ids += self.db.add_chunks(file, [(c.source, c.heading, c.start, c.end, c.text)], v[None])
        self.vectors.add(vectors, np.array(ids, np.int64))

    def commit(self, plan: Plan, old: dict[str, str]) -> tuple[dict, bool]:
        db = self.db
        for source, sha, chunks in plan.todo:
            db.set_file(source, sha, len(chunks))
        total = db.count()
        if len(self.vectors) > 2 * total:
            # More deleted labels than live ones: rebuild the graph from the stored vectors (no re-embedding).
            ids, vecs = db.all_vectors(self.dim)
            self.vectors = VectorStore.create(self.dim, capacity=len(ids))
            self.vectors.add(vecs, ids)
        db.commit()
        db.close()
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
        # The previous generation stays one more build: a reader that read the old manifest a moment ago
        # pins it next.
        keep = {self.gen, self.prev["generation"] if self.prev else self.gen}
        for old_gen in self.out.glob("gen-*"):
            if old_gen.name not in keep and not old_gen.name.endswith(".tmp"):
                _remove_unpinned(old_gen)

    def abort(self) -> None:
        if self.db is not None:  # roll back and close before deleting the files under it
            self.db.rollback()
            self.db.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
