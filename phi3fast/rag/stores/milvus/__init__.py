"""The Milvus store: chunks, metadata, vectors and the BM25 keyword index in one Milvus collection, so every
query server that can reach the Milvus server sees the same index.

    phi3fast index docs/ --out company.idx --store milvus:http://milvus.internal:19530   (token: $MILVUS_TOKEN)
    phi3fast index docs/ --out company.idx --store milvus:./rag.db                       (Milvus Lite, local)

INDEX_DIR keeps only MANIFEST.json (the store: uri and collection; the embedder; the chunking) and the writer
lock; `phi3fast query --index INDEX_DIR` reads the manifest and searches the collection.

Collection `phi3fast_<dir>_<hash>`: one row per chunk
    id INT64 (primary key)   file, sha256 (the file version)   added, removed (build epochs)
    source, heading, start, end, text   keywords (source, heading and text as FTS5 tokens)
    vector FLOAT_VECTOR (HNSW, COSINE)   sparse SPARSE_FLOAT_VECTOR (Milvus's BM25 function over `keywords`)
and `<collection>_state`: one row, the committed build epoch E and its chunk count.

Visibility: epochs
------------------
Milvus has no multi-row transactions, so readers filter on epochs and a build switches them with one write.
A search reads E from the state row and sees the rows with `added <= E and removed > E`. A build:
1. marks the rows of changed and deleted files removed = E + 1 (rewritten whole: still visible at E);
2. writes the new chunks with added = E + 1 (invisible at E), in batches;
3. commits: one single-row upsert of the state row to E + 1. Readers then see the new build whole, and
   nothing of the old versions; before it, the old build whole. Never half a file, never half a run.
The superseded rows stay one more build (a search that read E just before the commit still finds them); the
next build deletes rows with removed <= E first, and also cleans up after a failed run: its rows
(added > E) and its marks (removed = E + 1 on rows that are still current). Chunk ids are a hash of
(file, sha256, epoch, ordinal), so a retried upsert of a batch overwrites instead of doubling.

Keyword search: Milvus's analyzers differ between servers (tantivy, with stemmers) and Milvus Lite (a regex),
so phi3fast gives the BM25 function text that is already tokenized by the built-in store's FTS5 tokenizer
(keywords.fts_tokens: lowercase, accents folded, porter-stemmed), and tokenizes questions the same way (stopwords
dropped, as for FTS5): both stores, and Lite and servers, match the same words. Exact identifiers (XR-7755)
are matched as the FTS5 phrase of their tokens (LIKE '% xr 7755 %' over `keywords`), ranked by BM25.
BM25's constants and column weighting differ from FTS5's, so lower ranks can swap.
"""

from phi3fast.rag.stores.milvus.client import NEVER, connect, visible
from phi3fast.rag.stores.milvus.reader import MilvusStore, MilvusView
from phi3fast.rag.stores.milvus.writer import MilvusWriter

__all__ = ["NEVER", "MilvusStore", "MilvusView", "MilvusWriter", "connect", "visible"]
