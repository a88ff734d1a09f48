"""The RAG index: build it (incrementally, atomically, under a lock), open it, search it.

On-disk layout
--------------
    INDEX_DIR/MANIFEST.json         {"format", "version", "generation", "embedder": {name, dim, max_seq_length},
                                     "chunk_tokens", "overlap", "chunks", "files", "sizes": {file: bytes}}
    INDEX_DIR/gen-000007/chunks.sqlite   files, chunks (+ their vectors), the FTS5 table
    INDEX_DIR/gen-000007/vectors.hnsw    the phi3fast.hnsw graph, labels = chunk ids
    INDEX_DIR/.lock                 flock'ed by the one writer

Atomic commit: a build copies the current generation into `gen-NNNNNN.tmp`, applies the changes there, saves,
fsyncs, renames the folder, then replaces MANIFEST.json (temp file + os.replace). Until that last step every
reader and every later run sees the previous generation whole, so a crash or Ctrl-C mid-run loses nothing; the
stale .tmp folder is removed by the next build. The previous generation is kept one more round so a reader that
read the old manifest a moment ago can still open its files.

Exact identifiers
-----------------
Plain reciprocal rank fusion of dense and BM25 can bury a part number: for "XR-7755 part" the keyword list ranks
the one chunk holding XR-7755 first, but the embedder, which has never seen that code, ranks it 25th, and chunks
that merely talk about parts win the fusion. Hybrid search therefore fuses a third ranked list when the question
holds code-like words (a digit plus a letter or separator): the chunks that contain all of them (else any),
ranked by BM25. A question without identifiers fuses dense and keyword only, as usual.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from phi3fast.errors import Phi3FastError
from phi3fast.rag.chunking import chunk_document
from phi3fast.rag.embed import DEFAULT_EMBEDDER, Embedder, canonical_name
from phi3fast.rag.readers import SkipFile, iter_files, read_documents
from phi3fast.rag.store import Store
from phi3fast.rag.vectors import VectorStore

FORMAT = "phi3fast-rag-index"
VERSION = 1
MANIFEST = "MANIFEST.json"
DB_FILE = "chunks.sqlite"
VEC_FILE = "vectors.hnsw"
RRF_K = (
    60  # reciprocal rank fusion constant from Cormack et al. (2009); damps the weight of the top few ranks
)
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_OVERLAP = 32

Mode = Literal["hybrid", "dense", "keyword"]
MODES: tuple[str, ...] = ("hybrid", "dense", "keyword")


@dataclass(frozen=True)
class SearchResult:
    rank: int
    source: str
    heading: str
    score: float  # hybrid: RRF score; dense: cosine similarity; keyword: BM25 (higher is better)
    text: str
    start: int
    end: int

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class BuildStats:
    files_added: int
    files_changed: int
    files_unchanged: int
    files_deleted: int
    files_skipped: int
    chunks_embedded: int
    chunks_total: int
    seconds: float  # the whole run after the embedder is loaded
    embed_seconds: float  # of which: inside the embedder

    @property
    def chunks_per_second(self) -> float:
        return self.chunks_embedded / self.seconds if self.seconds > 0 else 0.0


def rrf_fuse(*ranked_lists: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: each id scores sum(1 / (RRF_K + rank)) over the lists holding it; best first.

    Ranks, not scores, are fused, so cosine similarities and BM25 values need no common scale. Ties keep the
    order of first appearance (dense first), which makes results deterministic.
    """
    fused: dict[int, float] = {}
    for lst in ranked_lists:
        for r, (cid, _) in enumerate(lst, 1):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + r)
    return sorted(fused.items(), key=lambda t: -t[1])


def _warn_stderr(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _read_manifest(out: Path) -> dict:
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
    except (KeyError, TypeError, ValueError):
        raise Phi3FastError(f"{path}: corrupt index manifest (missing fields)") from None
    return m


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _writer_lock(out: Path):  # noqa: ANN202
    """One writer per index: flock on INDEX_DIR/.lock (released by the kernel if the process dies)."""
    f = open(out / ".lock", "a+")  # noqa: SIM115
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Phi3FastError(
                f"{out}: another `phi3fast index` is writing this index (lock held)"
            ) from None
        yield
    finally:
        f.close()


class Index:
    """An opened index. Thread-safe for searches: one read-only SQLite connection per thread."""

    def __init__(self, path: Path, manifest: dict, embedder: Embedder | None) -> None:
        self.path = path
        self.manifest = manifest
        self.gen_dir = path / manifest["generation"]
        self.embedder_name: str = manifest["embedder"]["name"]
        self.dim: int = int(manifest["embedder"]["dim"])
        self._embedder = embedder
        self._embedder_lock = threading.Lock()
        self._local = threading.local()
        self.build_stats: BuildStats | None = None
        self._store()  # open and check in the calling thread, so a corrupt database fails open(), not search()
        self.vectors = VectorStore.load(self.gen_dir / VEC_FILE, self.dim)
        if len(self.vectors) < int(manifest["chunks"]):
            raise Phi3FastError(f"{self.gen_dir / VEC_FILE}: fewer vectors than chunks (corrupt index)")

    # -- opening --
    @classmethod
    def open(cls, path: str | Path, embedder: str | Embedder | None = None) -> Index:
        """Open an index. embedder (a name, a folder, or a loaded Embedder) must be the one it was built with;
        by default the recorded one is loaded when a dense or hybrid search first needs it."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            what = "no such directory" if not path.exists() else f"no {MANIFEST}"
            raise Phi3FastError(f"{path}: not a phi3fast index ({what}); build one with `phi3fast index`")
        m = _read_manifest(path)
        gen = path / m["generation"]
        for name, size in m["sizes"].items():
            f = gen / name
            if not f.is_file():
                raise Phi3FastError(f"{f}: missing (corrupt index; rebuild it with `phi3fast index`)")
            if f.stat().st_size != int(size):
                raise Phi3FastError(
                    f"{f}: {f.stat().st_size} bytes, the manifest says {size} (truncated or corrupt index)"
                )
        if embedder is not None:
            name = embedder.name if isinstance(embedder, Embedder) else canonical_name(embedder)
            if name != m["embedder"]["name"]:
                raise Phi3FastError(
                    f"{path} was built with embedder '{m['embedder']['name']}'; it cannot be searched with "
                    f"'{name}' (vectors from different embedders are not comparable: re-index or drop --embedder)"
                )
            if isinstance(embedder, str):
                embedder = None  # loaded lazily, under the recorded name
        index = cls(path, m, embedder)
        if index._embedder is not None:
            index._check_embedder(index._embedder)
        return index

    def _check_embedder(self, emb: Embedder) -> None:
        if emb.dim != self.dim:
            raise Phi3FastError(
                f"{self.path}: embedder '{emb.name}' gives {emb.dim}-dim vectors, the index holds {self.dim}-dim"
            )

    @property
    def embedder(self) -> Embedder:
        with self._embedder_lock:
            if self._embedder is None:
                emb = Embedder.shared(self.embedder_name)
                self._check_embedder(emb)
                self._embedder = emb
            return self._embedder

    def _store(self) -> Store:
        store = getattr(self._local, "store", None)
        if store is None:
            db = self.gen_dir / DB_FILE
            try:
                store = Store(db, readonly=True)
                store.check()
                count = store.count()
            except sqlite3.DatabaseError as e:
                raise Phi3FastError(f"{db}: corrupt chunk database ({e})") from None
            if count != int(self.manifest["chunks"]):
                raise Phi3FastError(
                    f"{db}: {count} chunks, the manifest says {self.manifest['chunks']} (corrupt)"
                )
            self._local.store = store
        return store

    def __len__(self) -> int:
        return int(self.manifest["chunks"])

    # -- searching --
    def search(self, question: str, k: int = 5, mode: Mode = "hybrid") -> list[SearchResult]:
        """The k best chunks for the question, best first."""
        if mode not in MODES:
            raise Phi3FastError(f"unknown search mode '{mode}' (choose from {', '.join(MODES)})")
        if k < 1:
            raise Phi3FastError(f"k must be >= 1, got {k}")
        if not question.strip():
            raise Phi3FastError("empty question")
        live = len(self)
        # Fusion needs candidates beyond k from each side: a chunk ranked 30th by one and 2nd by the other wins.
        depth = min(live, max(4 * k, 40) if mode == "hybrid" else k)
        store = self._store()
        dense: list[tuple[int, float]] = []
        keyword: list[tuple[int, float]] = []
        if mode in ("dense", "hybrid") and depth > 0:
            ids, sims = self.vectors.search(self.embedder.encode([question])[0], depth)
            dense = list(zip(ids.tolist(), sims.tolist(), strict=True))
        if mode in ("keyword", "hybrid"):
            keyword = store.keyword_search(question, depth)
        if mode == "dense":
            ranked = dense
        elif mode == "keyword":
            ranked = keyword
        else:
            # See "Exact identifiers" in the module docstring: a third ranked list for part numbers and codes.
            ranked = rrf_fuse(dense, keyword, store.identifier_search(question, depth))
        ranked = ranked[:k]
        rows = store.chunks([cid for cid, _ in ranked])
        out = []
        for cid, score in ranked:
            row = rows.get(cid)
            if row is None:  # a vector whose chunk is gone: the files disagree
                raise Phi3FastError(f"{self.gen_dir}: vector {cid} has no chunk (corrupt index; rebuild it)")
            out.append(
                SearchResult(len(out) + 1, row.source, row.heading, score, row.text, row.start, row.end)
            )
        return out

    # -- building --
    @classmethod
    def build(
        cls,
        paths: Sequence[str | Path],
        out: str | Path,
        *,
        embedder: str | Embedder | None = None,
        chunk_tokens: int | None = None,
        overlap: int | None = None,
        progress: bool = True,
        warn: Callable[[str], None] = _warn_stderr,
    ) -> Index:
        """Index the files under `paths` into `out` (created, or updated incrementally), and open it.

        The index mirrors the paths given: files no longer found under them are removed from it. Options left
        None keep the values the index was built with (or the defaults for a new index); changing the embedder
        or the chunking re-embeds everything.
        """
        out = Path(out)
        roots = [Path(p) for p in paths]
        if not roots:
            raise Phi3FastError("nothing to index: give at least one file or folder")
        if out.exists() and not out.is_dir():
            raise Phi3FastError(f"--out {out}: exists and is not a directory")
        if out.is_dir():
            foreign = [p.name for p in out.iterdir() if p.name not in (MANIFEST, ".lock", MANIFEST + ".tmp")]
            foreign = [n for n in foreign if not n.startswith("gen-")]
            if foreign:
                raise Phi3FastError(
                    f"--out {out}: not an index directory (it holds {foreign[0]!r}); pick a new one"
                )
        out.mkdir(parents=True, exist_ok=True)
        with _writer_lock(out):
            prev = None
            if (out / MANIFEST).exists():
                try:
                    prev = _read_manifest(out)
                except Phi3FastError as e:
                    warn(f"{e}; rebuilding the index from scratch")
            name = (
                canonical_name(embedder)
                if isinstance(embedder, str)
                else embedder.name
                if isinstance(embedder, Embedder)
                else prev["embedder"]["name"]
                if prev
                else DEFAULT_EMBEDDER
            )
            if chunk_tokens is None:
                chunk_tokens = prev["chunk_tokens"] if prev else DEFAULT_CHUNK_TOKENS
            overlap = overlap if overlap is not None else (prev["overlap"] if prev else DEFAULT_OVERLAP)
            if chunk_tokens < 16:
                raise Phi3FastError(f"--chunk-tokens must be >= 16, got {chunk_tokens}")
            if not 0 <= overlap < chunk_tokens // 2:
                raise Phi3FastError(
                    f"--overlap must be in [0, chunk_tokens/2) = [0, {chunk_tokens // 2}), got {overlap}"
                )
            emb = embedder if isinstance(embedder, Embedder) else Embedder.shared(name)
            t0 = time.perf_counter()  # after the model load: the stats measure indexing, not start-up
            if chunk_tokens > emb.max_seq_length:
                # Longer chunks would be silently cut by the model: refuse instead. (Up to the window itself is
                # fine: each chunk's budget also leaves room for the special tokens and its heading.)
                raise Phi3FastError(
                    f"--chunk-tokens {chunk_tokens} exceeds the {emb.max_seq_length}-token window of embedder "
                    f"'{emb.name}'"
                )
            config = {"embedder": asdict(emb.info), "chunk_tokens": chunk_tokens, "overlap": overlap}
            fresh = prev is None or any(prev.get(key) != v for key, v in config.items())
            if prev is not None and fresh:
                warn(f"{out}: embedder or chunking changed; re-embedding every file")
            elif prev is not None:
                try:  # an update starts from the current generation: it must be whole
                    cls.open(out, embedder=emb)
                except Phi3FastError as e:
                    warn(f"{e}; rebuilding the index from scratch")
                    fresh = True
            stats = _build_generation(out, roots, emb, prev, fresh, config, progress, warn, t0)
        index = cls.open(out, embedder=emb)
        index.build_stats = stats
        return index


def _next_generation(prev: dict | None) -> str:
    n = int(prev["generation"].split("-")[1]) + 1 if prev else 1
    return f"gen-{n:06d}"


def _build_generation(
    out: Path,
    roots: list[Path],
    emb: Embedder,
    prev: dict | None,
    fresh: bool,
    config: dict,
    progress: bool,
    warn: Callable[[str], None],
    t0: float,
) -> BuildStats:
    gen = _next_generation(prev)
    # Left by an interrupted run (a .tmp folder, or a renamed one whose manifest switch never happened):
    # we hold the lock and no manifest points there, so nobody reads them.
    for stale in out.glob("gen-*"):
        if stale.name.endswith(".tmp") or stale.name >= gen:
            shutil.rmtree(stale, ignore_errors=True)
    # A name of its own per run: a connection of a crashed run that is closed late must never touch our files.
    tmp = out / f"{gen}.{os.getpid()}-{time.monotonic_ns()}.tmp"
    tmp.mkdir()
    store = None
    try:
        store = Store(tmp / DB_FILE)
        if fresh:
            vectors = VectorStore.create(emb.dim)
        else:
            src = sqlite3.connect(f"file:{out / prev['generation'] / DB_FILE}?mode=ro", uri=True)
            try:
                src.backup(store.db)
            except sqlite3.DatabaseError as e:
                raise Phi3FastError(
                    f"{out / prev['generation'] / DB_FILE}: corrupt chunk database ({e})"
                ) from None
            finally:
                src.close()
            vectors = VectorStore.load(out / prev["generation"] / VEC_FILE, emb.dim)
        old = store.file_hashes()

        # Which files changed: content hash, not mtime (a copy or checkout touches mtimes of unchanged files).
        todo: list[tuple[str, str, list]] = []  # (source, sha256, chunks)
        seen: set[str] = set()
        added = changed = unchanged = skipped = 0

        def budget(heading: str) -> int:
            room = emb.max_seq_length - 2 - (emb.count_tokens(heading) + 1 if heading else 0)
            return max(config["overlap"] + 8, min(config["chunk_tokens"], room))

        for path, source in iter_files(roots):
            try:
                data = path.read_bytes()
            except OSError as e:  # permissions, a file removed mid-run: skip it like any unusable file
                warn(f"{path}: skipped: unreadable ({e.strerror or e})")
                skipped += 1
                continue
            sha = hashlib.sha256(data).hexdigest()
            if old.get(source) == sha:
                seen.add(source)
                unchanged += 1
                continue
            try:
                docs = read_documents(path, source)
            except SkipFile as e:
                warn(f"{path}: skipped: {e}")
                skipped += 1
                continue
            chunks = [
                c for d in docs for c in chunk_document(d, emb.token_offsets, budget, config["overlap"])
            ]
            if not chunks:
                warn(f"{path}: skipped: no text to index")
                skipped += 1
                continue
            seen.add(source)
            todo.append((source, sha, chunks))
            changed += source in old
            added += source not in old

        store.begin()
        removed = [s for s in old if s not in seen]
        for source in removed + [s for s, _, _ in todo if s in old]:
            vectors.delete(store.remove_file(source))
        texts = [c.embed_text() for _, _, chunks in todo for c in chunks]
        flat = [(source, sha, c) for source, sha, chunks in todo for c in chunks]
        pos = 0
        embed_s = 0.0
        batches = emb.encode_batches(texts, progress=progress)
        while True:
            t_embed = time.perf_counter()
            vecs = next(batches, None)
            embed_s += time.perf_counter() - t_embed
            if vecs is None:
                break
            ids = []
            for (source, _, c), v in zip(flat[pos : pos + len(vecs)], vecs, strict=True):
                ids += store.add_chunks(source, [(c.source, c.heading, c.start, c.end, c.text)], v[None])
            vectors.add(vecs, np.array(ids, np.int64))
            pos += len(vecs)
        for source, sha, chunks in todo:
            store.set_file(source, sha, len(chunks))
        total = store.count()
        if len(vectors) > 2 * total:
            # More deleted labels than live ones: rebuild the graph from the stored vectors (no re-embedding).
            ids, vecs = store.all_vectors(emb.dim)
            vectors = VectorStore.create(emb.dim, capacity=len(ids))
            vectors.add(vecs, ids)
        store.commit()
        store.close()
        vectors.save(tmp / VEC_FILE)
        stats = BuildStats(
            added,
            changed,
            unchanged,
            len(removed),
            skipped,
            len(texts),
            total,
            time.perf_counter() - t0,
            embed_s,
        )
        if prev is not None and not fresh and not todo and not removed:
            shutil.rmtree(tmp)  # nothing changed: keep the current generation
            return stats
        for f in (DB_FILE, VEC_FILE):
            _fsync(tmp / f)
        final = out / gen
        os.rename(tmp, final)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "generation": gen,
            **config,
            "chunks": total,
            "files": len(seen),
            "sizes": {f: (final / f).stat().st_size for f in (DB_FILE, VEC_FILE)},
        }
        tmp_manifest = out / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=1))
        _fsync(tmp_manifest)
        os.replace(tmp_manifest, out / MANIFEST)
        _fsync(out)
    except BaseException:
        if store is not None:  # roll back and close before deleting the files under it
            store.rollback()
            store.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    keep = {gen, prev["generation"] if prev else gen}
    for old_gen in out.glob("gen-*"):
        if old_gen.name not in keep and not old_gen.name.endswith(".tmp"):
            shutil.rmtree(old_gen, ignore_errors=True)
    return stats
