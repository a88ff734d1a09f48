"""The RAG index: open it, search it (hybrid dense + keyword, optionally reranked), export it; Index.build makes
or updates one (build.py).

On-disk layout
--------------
    INDEX_DIR/MANIFEST.json   what the index is (manifest.py)
    INDEX_DIR/.lock           flock'ed by the one writer

The chunks, vectors and keyword index live in a store (stores/base.py has the interface): the built-in one
(stores/builtin.py: SQLite + FTS5 + phi3fast.hnsw in INDEX_DIR/gen-NNNNNN/, the default) or a Milvus collection
(stores/milvus/, `store="milvus:URI"`), which the manifest names. Searching, fusion and results are this
module's, whatever the store, so both give the same hybrid ranking and the same JSON.

Hybrid search fuses the dense and keyword lists by their normalised scores, equally weighted (fusion.py says
why scores and not ranks).

Exact identifiers
-----------------
Plain fusion of dense and BM25 can bury a part number: for "XR-7755 part" the keyword list ranks the one chunk
holding XR-7755 first, but the embedder, which has never seen that code, ranks it 25th, and chunks that merely
talk about parts can win the fusion. Hybrid search therefore fuses a third ranked list when the question holds
code-like words (a digit plus a letter or separator): the chunks that contain all of them (else any), ranked by
BM25. A question without identifiers fuses dense and keyword only, as usual.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from phi3fast._utils import fsync
from phi3fast.errors import ArgumentError, Phi3FastError
from phi3fast.rag.build import BuildStats, build_index, warn_stderr
from phi3fast.rag.embedders import Embedder, canonical_name, shared_embedder
from phi3fast.rag.fusion import NORM_DEPTH, RRF_K, rrf_fuse, score_fuse
from phi3fast.rag.manifest import MANIFEST, read_manifest
from phi3fast.rag.rerank import Reranker, canonical_reranker_name, shared_reranker
from phi3fast.rag.stores import open_store
from phi3fast.rag.stores.base import EXPORT_COLUMNS, Store
from phi3fast.rag.stores.builtin import BuiltinStore
from phi3fast.rag.stores.sqlite import ChunkDB

__all__ = ["RRF_K", "BuildStats", "Index", "SearchResult", "rrf_fuse", "score_fuse"]

RERANK_DEPTH = 30  # fused candidates the cross-encoder rescores: past ~30 the right passage is rarely found
EXPORT_BATCH = 2048  # rows per Parquet row group: bounded memory for any index size

Mode = Literal["hybrid", "dense", "keyword"]
MODES: tuple[str, ...] = ("hybrid", "dense", "keyword")


@dataclass(frozen=True)
class SearchResult:
    rank: int
    source: str
    heading: str
    score: float  # hybrid: fused, 0 to 1.5 (reranked: the cross-encoder's); dense: cosine; keyword: BM25
    text: str
    start: int
    end: int

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def check_export_target(out: str | Path) -> Path:
    """The --export-parquet target must be a file name in an existing directory. The CLI checks it before a
    build too, so a long indexing run is not followed by a failed export."""
    out = Path(out)
    if out.is_dir():
        raise ArgumentError("export_parquet", f"{out}: is a directory; give a file name")
    if not out.parent.is_dir():
        raise ArgumentError("export_parquet", f"{out}: no such directory {out.parent}")
    return out


class Index:
    """An opened index. Thread-safe for searches. A built-in index follows rebuilds made while it is open
    (stores/builtin.py, "Note: readers across rebuilds")."""

    def __init__(
        self,
        path: Path,
        manifest: dict,
        embedder: Embedder | None,
        trust_remote_code: bool,
        reranker: str | None,
    ) -> None:
        self.path = path
        self.embedder_name: str = manifest["embedder"]["name"]
        self.dim: int = int(manifest["embedder"]["dim"])
        self.trust_remote_code = trust_remote_code
        self.reranker_name = reranker
        self._embedder = embedder
        self._reranker: Reranker | None = None
        self._load_lock = threading.Lock()
        self.build_stats: BuildStats | None = None
        self.store: Store = open_store(path, manifest)

    @property
    def manifest(self) -> dict:
        """The manifest of the build this index serves now."""
        return self.store.manifest

    # -- opening --
    @classmethod
    def open(
        cls,
        path: str | Path,
        embedder: str | Embedder | None = None,
        *,
        trust_remote_code: bool = False,
        reranker: str | None = None,
    ) -> Index:
        """Open an index. embedder (a name, a folder, or a loaded Embedder) must be the one it was built with;
        by default the recorded one is loaded when a dense or hybrid search first needs it.

        reranker: a sentence-transformers CrossEncoder (name or folder) that rescores hybrid results; None uses
        the one the index records (if any), "" or "none" none.

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
        if reranker is None:
            reranker = (m.get("reranker") or {}).get("name")
        elif reranker in ("", "none"):
            reranker = None
        else:
            reranker = canonical_reranker_name(reranker)
        index = cls(path, m, embedder, trust_remote_code, reranker)
        if index._embedder is not None:
            index._check_embedder(index._embedder)
        return index

    def close(self) -> None:
        """Release the files this index holds open (a built-in index pins its generation)."""
        close = getattr(self.store, "close", None)
        if close is not None:
            close()

    def _check_embedder(self, emb: Embedder) -> None:
        if emb.dim != self.dim:
            raise Phi3FastError(
                f"{self.path}: embedder '{emb.name}' gives {emb.dim}-dim vectors, the index holds {self.dim}-dim"
            )

    @property
    def embedder(self) -> Embedder:
        with self._load_lock:
            if self._embedder is None:
                emb = shared_embedder(self.embedder_name, trust_remote_code=self.trust_remote_code)
                self._check_embedder(emb)
                self._embedder = emb
            return self._embedder

    @property
    def reranker(self) -> Reranker | None:
        if self.reranker_name is None:
            return None
        with self._load_lock:
            if self._reranker is None:
                self._reranker = shared_reranker(self.reranker_name)
            return self._reranker

    def _chunk_db(self) -> ChunkDB:
        """This thread's SQLite connection of a built-in index (tests and bench/ read it directly)."""
        if not isinstance(self.store, BuiltinStore):
            raise Phi3FastError(f"{self.path}: not a built-in store index")
        return self.store.view().db()

    def __len__(self) -> int:
        return self.store.view().count()

    # -- searching --
    def search(self, question: str, k: int = 5, mode: Mode = "hybrid") -> list[SearchResult]:
        """The k best chunks for the question, best first."""
        if mode not in MODES:
            raise Phi3FastError(f"unknown search mode '{mode}' (choose from {', '.join(MODES)})")
        if k < 1:
            raise Phi3FastError(f"k must be >= 1, got {k}")
        if not question.strip():
            raise Phi3FastError("empty question")
        view = self.store.view()  # one consistent view for the whole search
        live = view.count()
        reranker = self.reranker if mode == "hybrid" else None
        want = max(k, RERANK_DEPTH) if reranker is not None else k
        # Fusion needs candidates beyond k from each side: a chunk ranked 30th by one and 2nd by the other wins.
        depth = min(live, max(4 * want, NORM_DEPTH) if mode == "hybrid" else k)
        dense: list[tuple[int, float]] = []
        keyword: list[tuple[int, float]] = []
        if mode in ("dense", "hybrid") and depth > 0:
            dense = view.dense(self.embedder.encode([question])[0], depth)
        if mode in ("keyword", "hybrid"):
            keyword = view.keyword(question, depth)
        if mode == "dense":
            ranked = dense
        elif mode == "keyword":
            ranked = keyword
        else:
            # See "Exact identifiers" in the module docstring: a third ranked list for part numbers and codes.
            ranked = score_fuse(dense, keyword, view.identifier(question, depth))
        ranked = ranked[:want]
        rows = view.rows([cid for cid, _ in ranked])
        found = []
        for cid, score in ranked:
            row = rows.get(cid)
            if row is None and self.manifest["store"]["kind"] == "milvus":
                continue  # deleted between the search and the fetch: an update's cleanup just ran
            if row is None:  # a vector whose chunk is gone: the files disagree
                raise Phi3FastError(f"{self.path}: vector {cid} has no chunk (corrupt index; rebuild it)")
            found.append((row, score))
        if reranker is not None and found:
            scores = reranker.scores(
                question, [f"{r.heading}\n{r.text}" if r.heading else r.text for r, _ in found]
            )
            order = sorted(range(len(found)), key=lambda i: -scores[i])  # stable: ties keep the fused order
            found = [(found[i][0], float(scores[i])) for i in order]
        return [
            SearchResult(n, row.source, row.heading, score, row.text, row.start, row.end)
            for n, (row, score) in enumerate(found[:k], 1)
        ]

    # -- exporting --
    def export_parquet(self, out: str | Path) -> int:
        """Write every chunk (id, vector, text and metadata; EXPORT_COLUMNS) to a Parquet file, atomically;
        return the row count. The column names are the Milvus collection's, so Milvus bulk import takes it."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ArgumentError("export_parquet", "needs pyarrow: pip install 'phi3fast[milvus]'") from None
        out = check_export_target(out)
        types = {"id": pa.int64(), "vector": pa.list_(pa.float32()), "start": pa.int64(), "end": pa.int64()}
        schema = pa.schema([(c, types.get(c, pa.string())) for c in EXPORT_COLUMNS])
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        n = 0
        try:
            with pq.ParquetWriter(tmp, schema) as w:
                for cols in self.store.view().export_batches(EXPORT_BATCH):
                    w.write_table(pa.table(cols, schema=schema))
                    n += len(cols["id"])
            fsync(tmp)
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
        reranker: str | None = None,
        trust_remote_code: bool = False,
        progress: bool = True,
        warn: Callable[[str], None] = warn_stderr,
    ) -> Index:
        """Index the files under `paths` into `out` (created, or updated incrementally), and open it.

        The index mirrors the paths given: files no longer found under them are removed from it. Options left
        None keep the values the index was built with (or the defaults for a new index); changing the embedder
        or the chunking re-embeds everything. store: "builtin" (the default for a new index) or "milvus:URI"
        (see phi3fast.rag.stores.milvus); an index stays in the store it was built in. reranker: a
        CrossEncoder name or folder recorded for searches ("" or "none" drops it; it is loaded once here, so a
        bad name fails the build, not the first query).
        """
        if reranker is not None:
            reranker = "" if reranker in ("", "none") else canonical_reranker_name(reranker)
            if reranker:
                shared_reranker(reranker)
        emb, stats = build_index(
            paths,
            out,
            embedder=embedder,
            chunk_tokens=chunk_tokens,
            overlap=overlap,
            store=store,
            reranker=reranker,
            trust_remote_code=trust_remote_code,
            progress=progress,
            warn=warn,
        )
        index = cls.open(out, embedder=emb, trust_remote_code=trust_remote_code)
        index.build_stats = stats
        return index
