"""RAG throughput and latency: indexing chunks/s, and query latency at 10k and 100k chunks with phi3fast.hnsw,
hnswlib and faiss as the vector store, and the whole hybrid path with the built-in store and with Milvus Lite,
in one run, on the same vectors and queries.

    python bench/rag.py [--quick] [--sizes 10000,100000] [--queries 200] [--no-milvus]

1. Indexing: `Index.build` end to end (read, chunk, embed with all-MiniLM-L6-v2, then the store) on a generated
   corpus of equipment manuals, into the built-in store (SQLite + FTS5 + HNSW) and into Milvus Lite
   (`--store milvus:`), with the share of the time spent inside the embedder and the store's own seconds.
2. Query latency at N chunks, one query at a time as `phi3fast query` runs them: embed the question (real
   MiniLM), then the vector search (k=10, ef=128, M=16, ef_construction=200 for every store), then, for
   phi3fast, the whole hybrid path (+ FTS5 BM25 + identifier list + score fusion) over the same N
   chunks in SQLite; and the same hybrid path through the Milvus store (Milvus Lite: HNSW COSINE + its BM25
   function + LIKE identifier filters, over gRPC to the local Milvus Lite server). recall@10 is against exact
   search (numpy), so the vector stores are compared at a stated recall.

Embedding 100k chunks on a 2-core CPU takes about an hour, so the N stored vectors are made from real MiniLM
embeddings of a few thousand generated chunks, each reused with Gaussian noise and re-normalized (distinct
vectors that keep the real embeddings' geometry); the stored texts are generated the same way. The questions
and their embeddings are real.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_rows  # noqa: E402

from phi3fast.rag import Index  # noqa: E402
from phi3fast.rag.embedders import Embedder, shared_embedder  # noqa: E402
from phi3fast.rag.fusion import NORM_DEPTH, score_fuse  # noqa: E402
from phi3fast.rag.stores.sqlite import ChunkDB  # noqa: E402
from phi3fast.rag.stores.vectors import EF_CONSTRUCTION, EF_SEARCH, M  # noqa: E402

K = 10

_EQUIP = [
    "pump",
    "valve",
    "compressor",
    "gearbox",
    "controller",
    "filter",
    "cylinder",
    "motor",
    "cooler",
    "hose",
]
_ACTIONS = [
    "inspect",
    "replace",
    "tighten",
    "clean",
    "lubricate",
    "calibrate",
    "drain",
    "flush",
    "test",
    "adjust",
]
_CAUSES = [
    "a worn seal",
    "contaminated oil",
    "a loose fitting",
    "an open sensor wire",
    "low supply voltage",
    "a clogged strainer",
    "air in the inlet line",
    "a stuck spool",
    "an overheated coil",
    "a cracked housing",
]


def _part(rng: random.Random) -> str:
    return f"{rng.choice('ABCDKMRVXZ')}{rng.choice('KRTXZ')}-{rng.randint(1000, 9999)}"


def _code(rng: random.Random) -> str:
    return f"{rng.choice('ECHV')}-{rng.randint(100, 999)}"


def paragraph(rng: random.Random, n_sentences: int) -> str:
    out = []
    for _ in range(n_sentences):
        eq, act, cause = rng.choice(_EQUIP), rng.choice(_ACTIONS), rng.choice(_CAUSES)
        out.append(
            rng.choice(
                [
                    f"If the {eq} shows fault {_code(rng)}, {act} it: the usual cause is {cause}.",
                    f"{act.capitalize()} the {eq} every {rng.randint(2, 40) * 50} hours and fit part {_part(rng)}.",
                    f"Fault {_code(rng)} on the {eq} points to {cause}; order kit {_part(rng)}.",
                    f"The {eq} runs at {rng.randint(10, 350)} bar; {act} it when {cause} is suspected.",
                ]
            )
        )
    return " ".join(out)


def write_corpus(root: Path, n_docs: int, rng: random.Random) -> None:
    root.mkdir(parents=True)
    for d in range(n_docs):
        eq = rng.choice(_EQUIP)
        parts = [f"# {eq.capitalize()} model {rng.randint(100, 999)} manual\n"]
        for s in range(6):
            parts.append(f"\n## Section {s + 1}: {rng.choice(_ACTIONS)} the {eq}\n\n{paragraph(rng, 12)}\n")
        (root / f"manual-{d:05d}.md").write_text("".join(parts))


def bench_indexing(
    emb: Embedder, n_docs: int, workdir: Path, rng: random.Random, milvus: bool
) -> tuple[list[dict], list[str]]:
    corpus = workdir / "corpus"
    write_corpus(corpus, n_docs, rng)
    rows, texts = [], []
    stores = [("builtin", None)] + ([("milvus lite", f"milvus:{workdir / 'index.db'}")] if milvus else [])
    for name, store in stores:
        index = Index.build(
            [corpus], workdir / f"index-{name.split()[0]}", embedder=emb, store=store, progress=False
        )
        st = index.build_stats
        if not texts:
            texts = [
                r[0] for r in index._chunk_db().conn.execute("SELECT heading || char(10) || text FROM chunks")
            ]
        rows.append(
            {
                "stage": f"index (end to end), {name}",
                "chunks": st.chunks_embedded,
                "chunks/s": st.chunks_per_second,
                "embedding chunks/s": st.chunks_embedded / st.embed_seconds,
                "embedding share": st.embed_seconds / st.seconds,
                "store s": st.seconds - st.embed_seconds,
            }
        )
    return rows, texts


def synthetic_vectors(seed_vecs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors: real embeddings reused with noise (sigma chosen so a copy stays near its source)."""
    base = seed_vecs[rng.integers(0, len(seed_vecs), n)]
    noisy = base + rng.standard_normal(base.shape, dtype=np.float32) * (0.6 / np.sqrt(base.shape[1]))
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


class Stores:
    """The three vector stores behind one small interface: build(vectors), search(q, k) -> ids."""

    @staticmethod
    def make(name: str, dim: int):  # noqa: ANN205
        if name == "phi3fast.hnsw":
            from phi3fast import hnsw

            return _HnswLike(hnsw.Index("cosine", dim))
        if name == "hnswlib":
            import hnswlib

            return _HnswLike(hnswlib.Index("cosine", dim))
        if name == "faiss":
            return _Faiss(dim)
        raise ValueError(name)


class _HnswLike:
    def __init__(self, index) -> None:  # noqa: ANN001
        self.index = index

    def build(self, vecs: np.ndarray) -> None:
        self.index.init_index(max_elements=len(vecs), M=M, ef_construction=EF_CONSTRUCTION, random_seed=100)
        self.index.add_items(vecs, np.arange(len(vecs)))
        self.index.set_ef(EF_SEARCH)

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.index.knn_query(q[None], k=k, num_threads=1)[0][0]

    def search_scored(self, q: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(label, cosine similarity) best first, as the RAG store's dense list."""
        labels, dists = self.index.knn_query(q[None], k=k, num_threads=1)
        return list(zip(labels[0].tolist(), (1.0 - dists[0]).tolist(), strict=True))


class _Faiss:
    def __init__(self, dim: int) -> None:
        import faiss

        self.faiss = faiss
        self.index = faiss.IndexHNSWFlat(dim, M, faiss.METRIC_INNER_PRODUCT)  # unit vectors: IP == cosine
        self.index.hnsw.efConstruction = EF_CONSTRUCTION

    def build(self, vecs: np.ndarray) -> None:
        self.index.add(vecs)
        self.index.hnsw.efSearch = EF_SEARCH

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(q[None], k)[1][0]


def percentiles(xs: list[float]) -> tuple[float, float]:
    return float(np.percentile(xs, 50)), float(np.percentile(xs, 95))


def bench_scale(
    emb: Embedder,
    n: int,
    seed_vecs: np.ndarray,
    questions: list[str],
    workdir: Path,
    rng: np.random.Generator,
    milvus: bool,
) -> list[dict]:
    vecs = synthetic_vectors(seed_vecs, n, rng)
    prng = random.Random(n)
    q_vecs, embed_ms = [], []
    for q in questions:
        t0 = time.perf_counter()
        q_vecs.append(emb.encode([q])[0])
        embed_ms.append((time.perf_counter() - t0) * 1e3)
    exact = [np.argsort(-(vecs @ qv))[:K] for qv in q_vecs]
    rows = []
    for name in ("phi3fast.hnsw", "hnswlib", "faiss"):
        store = Stores.make(name, vecs.shape[1])
        t0 = time.perf_counter()
        store.build(vecs)
        build_s = time.perf_counter() - t0
        store.search(q_vecs[0], K)  # warm-up
        search_ms, recall = [], []
        for qv, truth in zip(q_vecs, exact, strict=True):
            t0 = time.perf_counter()
            ids = store.search(qv, K)
            search_ms.append((time.perf_counter() - t0) * 1e3)
            recall.append(len(set(ids.tolist()) & set(truth.tolist())) / K)
        total = [e + s for e, s in zip(embed_ms, search_ms, strict=True)]
        p50, p95 = percentiles(total)
        s50, s95 = percentiles(search_ms)
        rows.append(
            {
                "chunks": n,
                "store": name,
                "build vec/s": n / build_s,
                "recall@10": float(np.mean(recall)),
                "search p50 ms": s50,
                "search p95 ms": s95,
                "query p50 ms": p50,
                "query p95 ms": p95,
            }
        )
        if name == "phi3fast.hnsw":
            hnsw_build_s = build_s
            hybrid_store = store
    rows.append(_hybrid_row(n, vecs, hybrid_store, hnsw_build_s, questions, q_vecs, embed_ms, workdir, prng))
    if milvus:
        rows.append(_milvus_row(n, vecs, questions, q_vecs, embed_ms, workdir, random.Random(n)))
    return rows


def _bench_texts(n: int, prng: random.Random) -> list[tuple[str, str, str]]:
    """(file, heading, text) of n generated chunks, 20 per file, identical for both stores (same seed)."""
    return [(f"manual-{i // 20:05d}.md", f"Section {i % 6}", paragraph(prng, 4)) for i in range(n)]


def _hybrid_stats(n: int, name: str, build_rate: float, store_ms: list[float], embed_ms: list[float]) -> dict:
    """A hybrid row: 'search' = the store's part (dense + BM25 + identifiers + fusion + row fetch), 'query' adds
    embedding the question."""
    s50, s95 = percentiles(store_ms)
    p50, p95 = percentiles([e + s for e, s in zip(embed_ms, store_ms, strict=True)])
    return {
        "chunks": n,
        "store": name,
        "build vec/s": build_rate,
        "search p50 ms": s50,
        "search p95 ms": s95,
        "query p50 ms": p50,
        "query p95 ms": p95,
    }


def _hybrid_row(n, vecs, store, hnsw_build_s, questions, q_vecs, embed_ms, workdir, prng) -> dict:  # noqa: ANN001
    """The full hybrid path of Index.search over n chunks in SQLite + FTS5 (vectors from `store`)."""
    db = workdir / f"hybrid-{n}.sqlite"
    t0 = time.perf_counter()
    st = ChunkDB(db)
    st.begin()
    rows = ((f, h, 0, 1, t) for f, h, t in _bench_texts(n, prng))
    ids = st.add_chunks("bench", rows, vecs)
    st.commit()
    build_s = time.perf_counter() - t0 + hnsw_build_s
    assert ids[0] == 1 and ids[-1] == n  # chunk id = vector label + 1
    depth = max(4 * 5, NORM_DEPTH)

    def one_pass() -> list[float]:
        times = []
        for q, qv in zip(questions, q_vecs, strict=True):
            t0 = time.perf_counter()
            dense = [(int(i) + 1, sim) for i, sim in store.search_scored(qv, depth)]
            fused = score_fuse(dense, st.keyword_search(q, depth), st.identifier_search(q, depth))[:5]
            st.chunks([cid for cid, _ in fused])
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    one_pass()  # warm-up, as for Milvus below: the table has the second pass
    store_ms = one_pass()
    st.close()
    return _hybrid_stats(n, "builtin hybrid (HNSW+FTS5, fused)", n / build_s, store_ms, embed_ms)


def _milvus_row(n, vecs, questions, q_vecs, embed_ms, workdir, prng) -> dict:  # noqa: ANN001
    """The same hybrid path through the Milvus store (Milvus Lite), on the same vectors, texts and questions:
    written by MilvusWriter (batched upserts, committed), searched through MilvusStore as Index.search does."""
    from phi3fast.rag.chunking import Chunk
    from phi3fast.rag.stores import parse_store
    from phi3fast.rag.stores.base import Plan
    from phi3fast.rag.stores.milvus import MilvusStore, MilvusWriter

    out = workdir / f"milvus-{n}"
    out.mkdir()
    chunks = [Chunk(f, h, 0, 1, t) for f, h, t in _bench_texts(n, prng)]
    items = [(c.source, "0" * 64, i, c) for i, c in enumerate(chunks)]
    t0 = time.perf_counter()
    writer = MilvusWriter(
        out, parse_store(f"milvus:{workdir / f'bench-{n}.db'}"), True, vecs.shape[1], False, print
    )
    plan = Plan(todo=[("bench", "0" * 64, chunks)])
    writer.begin(plan, {})
    for i in range(0, n, 1024):  # as Index.build hands over embedded batches
        writer.add(items[i : i + 1024], vecs[i : i + 1024])
    writer.commit(plan, {})
    writer.cleanup()
    build_s = time.perf_counter() - t0
    manifest = {"store": writer.cfg, "embedder": {"dim": vecs.shape[1]}}
    backend = MilvusStore.open(out, manifest)
    depth = max(4 * 5, NORM_DEPTH)

    def one_pass() -> list[float]:
        times = []
        for q, qv in zip(questions, q_vecs, strict=True):
            t0 = time.perf_counter()
            reader = backend.view()
            fused = score_fuse(
                reader.dense(qv, depth), reader.keyword(q, depth), reader.identifier(q, depth)
            )[:5]
            reader.rows([cid for cid, _ in fused])
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    # Milvus Lite compacts the flushed segments and builds their indexes in a background thread after the
    # build returns; queries meanwhile are slower. The first pass is reported apart, the table has the second.
    first = one_pass()
    print(
        f"{n} chunks, milvus lite: first pass (background compaction running): search p50 {percentiles(first)[0]:.1f} ms"
    )
    store_ms = one_pass()
    return _hybrid_stats(n, "milvus lite hybrid (HNSW+BM25, fused)", n / build_s, store_ms, embed_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small corpus, 10k chunks only, 50 queries")
    ap.add_argument("--sizes", default=None, help="comma-separated chunk counts [default: 10000,100000]")
    ap.add_argument("--queries", type=int, default=None, help="questions per size [default: 200]")
    ap.add_argument("--docs", type=int, default=None, help="documents to index end to end [default: 120]")
    ap.add_argument("--no-milvus", action="store_true", help="skip the Milvus Lite rows")
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or ("10000" if args.quick else "10000,100000")).split(",")]
    n_queries = args.queries or (50 if args.quick else 200)
    n_docs = args.docs or (20 if args.quick else 120)
    rng, prng = np.random.default_rng(0), random.Random(0)
    print(f"sqlite {sqlite3.sqlite_version}; loading the embedder ...", flush=True)
    emb = shared_embedder()
    with tempfile.TemporaryDirectory(prefix="phi3fast-bench-rag-") as tmp:
        work = Path(tmp)
        index_rows, texts = bench_indexing(emb, n_docs, work, prng, not args.no_milvus)
        print_table(index_rows, list(index_rows[0]))
        seed_vecs = emb.encode(texts)
        questions = [
            rng_q
            for rng_q in (
                prng.choice(
                    [
                        f"What does fault {_code(prng)} on the {prng.choice(_EQUIP)} mean?",
                        f"How often should I {prng.choice(_ACTIONS)} the {prng.choice(_EQUIP)}?",
                        f"Which kit replaces part {_part(prng)}?",
                        f"Why would the {prng.choice(_EQUIP)} have {prng.choice(_CAUSES)}?",
                    ]
                )
                for _ in range(n_queries)
            )
        ]
        rows = []
        for n in sizes:
            print(f"\n{n} chunks: building the stores ...", flush=True)
            rows += bench_scale(emb, n, seed_vecs, questions, work, rng, not args.no_milvus)
    cols = [
        "chunks",
        "store",
        "build vec/s",
        "recall@10",
        "search p50 ms",
        "search p95 ms",
        "query p50 ms",
        "query p95 ms",
    ]
    print(
        f"\nquery = embed the question (MiniLM, CPU) + search, one question at a time; k={K}, ef={EF_SEARCH}, M={M}"
    )
    print_table(rows, cols)
    for n in sizes:
        by = {r["store"]: r for r in rows if r["chunks"] == n and "search p50 ms" in r}
        ours = by["phi3fast.hnsw"]
        for peer in ("hnswlib", "faiss"):
            print(
                f"{n} chunks, phi3fast.hnsw vs {peer}: search p50 {ours['search p50 ms']:.3f} vs "
                f"{by[peer]['search p50 ms']:.3f} ms ({by[peer]['search p50 ms'] / ours['search p50 ms']:.2f}x), "
                f"build {ours['build vec/s'] / by[peer]['build vec/s']:.2f}x the vectors/s, recall@10 "
                f"{ours['recall@10']:.3f} vs {by[peer]['recall@10']:.3f}"
            )
    name = "rag-quick" if args.quick else "rag"
    for n in sizes:
        by = {r["store"]: r for r in rows if r["chunks"] == n}
        mv, bi = by.get("milvus lite hybrid (HNSW+BM25, fused)"), by["builtin hybrid (HNSW+FTS5, fused)"]
        if mv:
            print(
                f"{n} chunks, hybrid search without embedding, milvus lite vs builtin: p50 "
                f"{mv['search p50 ms']:.1f} vs {bi['search p50 ms']:.1f} ms "
                f"({mv['search p50 ms'] / bi['search p50 ms']:.2f}x), p95 {mv['search p95 ms']:.1f} vs "
                f"{bi['search p95 ms']:.1f} ms; store build {mv['build vec/s']:.0f} vs {bi['build vec/s']:.0f} chunks/s"
            )
    rows_out = [{"kind": "index", **r} for r in index_rows] + [{"kind": "query", **r} for r in rows]
    print(f"wrote {write_rows(name, rows_out)}")


if __name__ == "__main__":
    main()
