"""The RAG index: build it (incrementally, atomically, under a lock), open it, search it.

On-disk layout
--------------
    INDEX_DIR/MANIFEST.json   {"format", "version", "generation", "store": {kind, ...},
                               "embedder": {name, dim, max_seq_length, trust_remote_code},
                               "chunk_tokens", "overlap", "chunks", "files", "sizes": {file: bytes}}
    INDEX_DIR/.lock           flock'ed by the one writer

The chunks, vectors and keyword index live in a store (backend.py has the interface): the built-in one
(store.py: SQLite + FTS5 + phi3fast.hnsw in INDEX_DIR/gen-NNNNNN/, the default) or a Milvus collection
(milvus.py, `store="milvus:URI"`), which the manifest names. Searching, fusion and results are this module's,
whatever the store, so both give the same hybrid ranking and the same JSON.

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
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from phi3fast.errors import Phi3FastError
from phi3fast.rag.backend import (
    EXPORT_COLUMNS,
    FORMAT,
    MANIFEST,
    VERSION,
    Backend,
    Writer,
    plan_changes,
    read_manifest,
    write_manifest,
)
from phi3fast.rag.embed import DEFAULT_EMBEDDER, Embedder, canonical_name
from phi3fast.rag.store import BuiltinBackend, BuiltinWriter, Store

RRF_K = (
    60  # reciprocal rank fusion constant from Cormack et al. (2009); damps the weight of the top few ranks
)
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_OVERLAP = 32
EXPORT_BATCH = 2048  # rows per Parquet row group: bounded memory for any index size

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


def _same_embedder(a: dict, b: dict) -> bool:
    """Same vectors: trust_remote_code is how a model may be loaded, not which model it is."""
    keys = ("name", "dim", "max_seq_length")
    return all(a.get(k) == b.get(k) for k in keys)


def _open_backend(path: Path, manifest: dict) -> Backend:
    kind = manifest["store"].get("kind")
    if kind == "builtin":
        return BuiltinBackend.open(path / manifest["generation"], manifest)
    if kind == "milvus":
        from phi3fast.rag.milvus import MilvusBackend

        return MilvusBackend.open(manifest["store"], int(manifest["embedder"]["dim"]), path)
    raise Phi3FastError(f"{path / MANIFEST}: unknown store kind {kind!r} (a newer phi3fast wrote it?)")


def check_export_target(out: str | Path) -> Path:
    """The --export-parquet target must be a file name in an existing directory. The CLI checks it before a
    build too, so a long indexing run is not followed by a failed export."""
    out = Path(out)
    if out.is_dir():
        raise Phi3FastError(f"--export-parquet {out}: is a directory; give a file name")
    if not out.parent.is_dir():
        raise Phi3FastError(f"--export-parquet {out}: no such directory {out.parent}")
    return out


class Index:
    """An opened index. Thread-safe for searches."""

    def __init__(
        self, path: Path, manifest: dict, embedder: Embedder | None, trust_remote_code: bool
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.gen_dir = path / manifest["generation"]
        self.embedder_name: str = manifest["embedder"]["name"]
        self.dim: int = int(manifest["embedder"]["dim"])
        self.trust_remote_code = trust_remote_code
        self._embedder = embedder
        self._embedder_lock = threading.Lock()
        self.build_stats: BuildStats | None = None
        self.backend: Backend = _open_backend(path, manifest)

    # -- opening --
    @classmethod
    def open(
        cls, path: str | Path, embedder: str | Embedder | None = None, *, trust_remote_code: bool = False
    ) -> Index:
        """Open an index. embedder (a name, a folder, or a loaded Embedder) must be the one it was built with;
        by default the recorded one is loaded when a dense or hybrid search first needs it.

        trust_remote_code is never taken from the manifest (a copied index must not run code on its own say):
        an index built with --trust-remote-code is searched with it too."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            what = "no such directory" if not path.exists() else f"no {MANIFEST}"
            raise Phi3FastError(f"{path}: not a phi3fast index ({what}); build one with `phi3fast index`")
        m = read_manifest(path)
        if embedder is not None:
            name = embedder.name if isinstance(embedder, Embedder) else canonical_name(embedder)
            if name != m["embedder"]["name"]:
                raise Phi3FastError(
                    f"{path} was built with embedder '{m['embedder']['name']}'; it cannot be searched with "
                    f"'{name}' (vectors from different embedders are not comparable: re-index or drop --embedder)"
                )
            if isinstance(embedder, str):
                embedder = None  # loaded lazily, under the recorded name
        index = cls(path, m, embedder, trust_remote_code)
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
                emb = Embedder.shared(self.embedder_name, trust_remote_code=self.trust_remote_code)
                self._check_embedder(emb)
                self._embedder = emb
            return self._embedder

    def _store(self) -> Store:
        """This thread's SQLite connection of a built-in index (tests and bench/ read it directly)."""
        if not isinstance(self.backend, BuiltinBackend):
            raise Phi3FastError(f"{self.path}: not a built-in store index")
        return self.backend.store()

    def __len__(self) -> int:
        return self.backend.view().count()

    # -- searching --
    def search(self, question: str, k: int = 5, mode: Mode = "hybrid") -> list[SearchResult]:
        """The k best chunks for the question, best first."""
        if mode not in MODES:
            raise Phi3FastError(f"unknown search mode '{mode}' (choose from {', '.join(MODES)})")
        if k < 1:
            raise Phi3FastError(f"k must be >= 1, got {k}")
        if not question.strip():
            raise Phi3FastError("empty question")
        reader = self.backend.view()  # one consistent view for the whole search
        live = reader.count()
        # Fusion needs candidates beyond k from each side: a chunk ranked 30th by one and 2nd by the other wins.
        depth = min(live, max(4 * k, 40) if mode == "hybrid" else k)
        dense: list[tuple[int, float]] = []
        keyword: list[tuple[int, float]] = []
        if mode in ("dense", "hybrid") and depth > 0:
            dense = reader.dense(self.embedder.encode([question])[0], depth)
        if mode in ("keyword", "hybrid"):
            keyword = reader.keyword(question, depth)
        if mode == "dense":
            ranked = dense
        elif mode == "keyword":
            ranked = keyword
        else:
            # See "Exact identifiers" in the module docstring: a third ranked list for part numbers and codes.
            ranked = rrf_fuse(dense, keyword, reader.identifier(question, depth))
        ranked = ranked[:k]
        rows = reader.rows([cid for cid, _ in ranked])
        out = []
        for cid, score in ranked:
            row = rows.get(cid)
            if row is None and self.manifest["store"]["kind"] == "milvus":
                continue  # deleted between the search and the fetch: an update's cleanup just ran
            if row is None:  # a vector whose chunk is gone: the files disagree
                raise Phi3FastError(f"{self.gen_dir}: vector {cid} has no chunk (corrupt index; rebuild it)")
            out.append(
                SearchResult(len(out) + 1, row.source, row.heading, score, row.text, row.start, row.end)
            )
        return out

    # -- exporting --
    def export_parquet(self, out: str | Path) -> int:
        """Write every chunk (id, vector, text and metadata; EXPORT_COLUMNS) to a Parquet file, atomically;
        return the row count. The column names are the Milvus collection's, so Milvus bulk import takes it."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise Phi3FastError("--export-parquet needs pyarrow: pip install 'phi3fast[milvus]'") from None
        out = check_export_target(out)
        types = {"id": pa.int64(), "vector": pa.list_(pa.float32()), "start": pa.int64(), "end": pa.int64()}
        schema = pa.schema([(c, types.get(c, pa.string())) for c in EXPORT_COLUMNS])
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        n = 0
        try:
            with pq.ParquetWriter(tmp, schema) as w:
                for cols in self.backend.view().export_batches(EXPORT_BATCH):
                    w.write_table(pa.table(cols, schema=schema))
                    n += len(cols["id"])
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return n

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
        store: str | None = None,
        trust_remote_code: bool = False,
        progress: bool = True,
        warn: Callable[[str], None] = _warn_stderr,
    ) -> Index:
        """Index the files under `paths` into `out` (created, or updated incrementally), and open it.

        The index mirrors the paths given: files no longer found under them are removed from it. Options left
        None keep the values the index was built with (or the defaults for a new index); changing the embedder
        or the chunking re-embeds everything. store: "builtin" (the default for a new index) or "milvus:URI"
        (see phi3fast.rag.milvus); an index stays in the store it was built in.
        """
        from phi3fast.rag.milvus import parse_store, same_store, store_label

        out = Path(out)
        roots = [Path(p) for p in paths]
        if not roots:
            raise Phi3FastError("nothing to index: give at least one file or folder")
        if out.exists() and not out.is_dir():
            raise Phi3FastError(f"--out {out}: exists and is not a directory")
        wanted = parse_store(store) if store is not None else None
        if out.is_dir():
            allowed = {MANIFEST, ".lock", MANIFEST + ".tmp"}
            lite = {(wanted or {}).get("uri")}  # a Milvus Lite file may sit in the index directory
            try:
                lite.add(read_manifest(out)["store"].get("uri"))
            except Phi3FastError:
                pass
            foreign = [
                p.name for p in out.iterdir() if p.name not in allowed and str(p.resolve()) not in lite
            ]
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
                    prev = read_manifest(out)
                except Phi3FastError as e:
                    warn(f"{e}; rebuilding the index from scratch")
            if prev is not None and wanted is not None and not same_store(prev["store"], wanted):
                raise Phi3FastError(
                    f"--out {out}: this index lives in {store_label(prev['store'])}; it cannot move to "
                    f"{store_label(wanted)}: build into a new --out directory"
                )
            store_cfg = prev["store"] if prev is not None else (wanted or {"kind": "builtin"})
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
            if isinstance(embedder, Embedder):
                emb = embedder
                trust_remote_code = bool(getattr(emb, "trust_remote_code", trust_remote_code))
            else:
                emb = Embedder.shared(name, trust_remote_code=trust_remote_code)
            t0 = time.perf_counter()  # after the model load: the stats measure indexing, not start-up
            if chunk_tokens > emb.max_seq_length:
                # Longer chunks would be silently cut by the model: refuse instead. (Up to the window itself is
                # fine: each chunk's budget also leaves room for the special tokens and its heading.)
                raise Phi3FastError(
                    f"--chunk-tokens {chunk_tokens} exceeds the {emb.max_seq_length}-token window of embedder "
                    f"'{emb.name}'"
                )
            config = {
                "embedder": {**asdict(emb.info), "trust_remote_code": trust_remote_code},
                "chunk_tokens": chunk_tokens,
                "overlap": overlap,
            }
            fresh = (
                prev is None
                or not _same_embedder(prev["embedder"], config["embedder"])
                or (prev["chunk_tokens"], prev["overlap"]) != (chunk_tokens, overlap)
            )
            if prev is not None and fresh:
                warn(f"{out}: embedder or chunking changed; re-embedding every file")
            elif prev is not None and store_cfg["kind"] == "builtin":
                try:  # an update starts from the current generation: it must be whole
                    cls.open(out, embedder=emb, trust_remote_code=trust_remote_code)
                except Phi3FastError as e:
                    warn(f"{e}; rebuilding the index from scratch")
                    fresh = True
            # (Milvus: the writer reads which file versions are in from the collection itself, the truth.)
            if store_cfg["kind"] == "builtin":
                writer: Writer = BuiltinWriter(out, prev, fresh, emb.dim)
            else:
                from phi3fast.rag.milvus import MilvusWriter

                writer = MilvusWriter(out, store_cfg, fresh, emb.dim, progress, warn)
            stats = _run_build(out, writer, roots, emb, config, progress, warn, t0)
        index = cls.open(out, embedder=emb, trust_remote_code=trust_remote_code)
        index.build_stats = stats
        return index


def _run_build(
    out: Path,
    writer: Writer,
    roots: list[Path],
    emb: Embedder,
    config: dict,
    progress: bool,
    warn: Callable[[str], None],
    t0: float,
) -> BuildStats:
    """The build every store shares: plan, embed in batches, hand each batch to the writer, commit."""
    try:
        old = writer.file_hashes()
        plan = plan_changes(roots, old, emb.token_offsets, emb.count_tokens, emb.max_seq_length, config, warn)
        writer.begin(plan, old)
        flat = [(source, sha, i, c) for source, sha, chunks in plan.todo for i, c in enumerate(chunks)]
        texts = [c.embed_text() for *_, c in flat]
        pos = 0
        embed_s = 0.0
        batches = emb.encode_batches(texts, progress=progress)
        while True:
            t_embed = time.perf_counter()
            vecs = next(batches, None)
            embed_s += time.perf_counter() - t_embed
            if vecs is None:
                break
            writer.add(flat[pos : pos + len(vecs)], vecs)
            pos += len(vecs)
        fields, changed = writer.commit(plan, old)
        if changed:
            manifest = {"format": FORMAT, "version": VERSION, **config, **fields, "files": len(plan.seen)}
            write_manifest(out, manifest)
    except BaseException:
        writer.abort()
        raise
    if changed:
        writer.cleanup()
    removed = len(plan.removed)
    return BuildStats(
        plan.added,
        plan.changed,
        plan.unchanged,
        removed,
        plan.skipped,
        len(texts),
        int(fields["chunks"]),
        time.perf_counter() - t0,
        embed_s,
    )
