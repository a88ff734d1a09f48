"""Approximate nearest-neighbour search: a drop-in for hnswlib 0.8's Python API, backed by phi3fast's C++ index.

    from phi3fast import hnsw            # instead of: import hnswlib
    index = hnsw.Index("cosine", 384)
    index.init_index(max_elements=100_000, M=16, ef_construction=200, storage="int8")
    index.add_items(vectors, ids)
    labels, distances = index.knn_query(queries, k=10, filter=allowed_ids)

Same names, defaults, return types (labels uint64 [n, k], distances float32 [n, k]) and exception types as
hnswlib; 'ip' distance is 1 - dot and 'cosine' normalizes vectors, as there. What differs, on purpose:

- `init_index(..., storage='float32'|'float16'|'int8')`: compact storage. Search traverses the codes directly
  against a float32 query. No float32 copy is kept for re-ranking, because that copy would cost more bytes than
  the codes save; 'int8' uses a per-vector offset and step (8 bits over each vector's own range), accurate
  enough for recall@10 >= 0.95 at a somewhat larger ef. `get_items` returns the decoded (lossy) vectors.
- `filter` also takes a numpy array of allowed ids or a boolean mask indexed by id, checked in C++; when few
  ids are allowed, the search scans the allowed set exactly instead of walking the graph, so recall does not
  collapse. A callable filter is hnswlib's per-candidate call, with an exact scan when the graph walk finds
  fewer than k.
- `add_items` and `knn_query` may run concurrently from different threads.
- Errors are raised instead of crashing: using an index before `init_index`, NaN/inf vectors, complex data,
  negative ids, a batch that exceeds capacity (refused whole, before anything is added), an unknown id in
  `BFIndex.delete_vector`, and truncated, corrupted or foreign files. Exceptions are hnswlib's types
  (RuntimeError, ValueError, TypeError) and also `phi3fast.errors.Phi3FastError`.
- `save_index` writes a versioned, checksummed file atomically; `load_index` reads it and also hnswlib's own
  index files (space and dim come from the Index they are loaded into).
"""

from __future__ import annotations

from phi3fast._hnsw import (
    BFIndex,
    HnswError,
    HnswOverflowError,
    HnswTypeError,
    HnswValueError,
    Index,
    simd_level,
)

STORAGES = ("float32", "float16", "int8")
SPACES = ("l2", "ip", "cosine")

__all__ = [
    "BFIndex",
    "HnswError",
    "HnswOverflowError",
    "HnswTypeError",
    "HnswValueError",
    "Index",
    "SPACES",
    "STORAGES",
    "simd_level",
]
