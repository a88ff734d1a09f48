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
  fewer than k; in an exact scan (and in `BFIndex`) it is called only for a candidate that would enter the top k.
- When ef (or k) is at least a quarter of the element count, the search scans exactly instead of walking the
  graph: the walk would visit most nodes anyway, and in 'ip' it can miss neighbours no ef reaches.
- `get_items` takes labels of any shape (e.g. `knn_query`'s [n, k] labels), read in order.
- `add_items`, `knn_query`, `mark_deleted`, `resize_index`, `load_index`, copies and pickles may run concurrently
  from different threads; concurrent `add_items` without ids get distinct automatic labels.
- Errors are raised instead of crashing: using an index before `init_index`, NaN/inf vectors, complex data,
  negative ids, a batch that exceeds capacity (refused whole, before anything is added), an unknown id in
  `BFIndex.delete_vector`, and truncated, corrupted or foreign files. Exceptions are hnswlib's types
  (RuntimeError, ValueError, TypeError) and also `phi3fast.errors.Phi3FastError`.
- `save_index` writes a versioned, checksummed file atomically; `load_index` reads it and also hnswlib's own
  index files (space and dim come from the Index they are loaded into); `BFIndex.load_index` also reads
  hnswlib's BFIndex files.

Coming from hnswlib (the converters live in phi3fast.hnsw.hnswlib_format):

    index = hnsw.Index(hnswlib_index)                  # a live hnswlib.Index
    index = hnsw.Index(hnswlib_index.__getstate__())   # its state, (params,) or the params dict itself
    index = hnsw.load_hnswlib_pickle("index.pkl")      # a pickle of hnswlib objects, hnswlib not needed
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from phi3fast import _hnsw
from phi3fast._hnsw import (
    SPACES,
    STORAGES,
    HnswError,
    HnswOverflowError,
    HnswTypeError,
    HnswValueError,
    simd_level,
)
from phi3fast.hnsw import hnswlib_format as fmt

__all__ = [
    "BFIndex",
    "load_hnswlib_pickle",
    "HnswError",
    "HnswOverflowError",
    "HnswTypeError",
    "HnswValueError",
    "Index",
    "SPACES",
    "STORAGES",
    "simd_level",
]


@contextmanager
def _scratch_file(what: str) -> Iterator[str]:
    """A temp path to hand bytes to the engine's `load_index(path)`. Going through a file keeps to the public
    API (its byte-level entry is private to its pickle state); errors name `what`, not the temp path."""
    with tempfile.TemporaryDirectory(prefix="phi3fast-hnswlib-") as d:
        tmp = os.path.join(d, "index.bin")
        try:
            yield tmp
        except HnswError as e:
            raise HnswError(str(e).replace(tmp, what)) from None


# Design note (hnswlib constructors): the C++ class already takes (space, dim) and (index). hnswlib's
# params-dict constructor is added here in Python: the dict becomes hnswlib's own index file, which the
# C++ loader reads, so there is one reader of hnswlib graphs and it validates every link.
class Index(_hnsw.Index):
    """hnswlib-compatible HNSW index. `Index(space, dim)`, `Index(index)` (a phi3fast or hnswlib index: a deep
    copy) or `Index(params)` (hnswlib's params dict, or the `(params,)` tuple its `__getstate__` returns)."""

    def __init__(
        self,
        space: str | Mapping[str, Any] | tuple[Any, ...] | _hnsw.Index | None = None,
        dim: int | None = None,
        *,
        params: Mapping[str, Any] | tuple[Any, ...] | None = None,
        index: Any = None,
        simd: str | None = None,
    ) -> None:
        if params is None and index is None and space is not None and not isinstance(space, str):
            # hnswlib's positional forms: Index(params) and Index(index)
            if isinstance(space, (Mapping, tuple)):
                params = space
            else:
                index = space
            space = None
        if index is not None and fmt.is_hnswlib_index(index):
            params, index = index.__getstate__(), None
        if (params is not None) + (index is not None) + (space is not None or dim is not None) != 1:
            raise HnswTypeError("Index() takes (space, dim), (params) or (index)")
        if isinstance(params, tuple) and not fmt.is_hnswlib_state(params):
            super().__setstate__(params)  # our own __getstate__(), so Index(ix.__getstate__()) works for both
        elif params is not None:
            self._init_from_params(fmt.parse_params(params), simd)
        elif index is not None:
            if not isinstance(index, _hnsw.Index):
                raise HnswTypeError(
                    f"Index(index): expected a phi3fast or hnswlib Index, got {type(index).__name__}"
                )
            super().__init__(index)
        else:
            if space is None or dim is None:
                raise HnswTypeError("Index() takes (space, dim), (params) or (index)")
            super().__init__(space, dim, simd=simd)

    def _init_from_params(self, p: fmt.HnswlibParams, simd: str | None) -> None:
        super().__init__(p.space, p.dim, simd=simd)
        if p.index_file is not None:
            with _scratch_file("hnswlib params") as tmp:
                Path(tmp).write_bytes(p.index_file)
                self.load_index(tmp, 0, p.allow_replace_deleted)
        self.set_ef(p.ef)
        self.set_num_threads(p.num_threads)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        # hnswlib's pickles carry (params,); ours carry the engine's own tuple
        if fmt.is_hnswlib_state(state):
            self._init_from_params(fmt.parse_params(state), None)
        else:
            super().__setstate__(state)


class BFIndex(_hnsw.BFIndex):
    """hnswlib-compatible exact index; `load_index` reads phi3fast's and hnswlib's BFIndex files."""

    def load_index(self, path_to_index: str, max_elements: int = 0) -> None:
        path = os.fspath(path_to_index)
        try:
            with open(path, "rb") as f:
                ours = f.read(len(fmt.BF_MAGIC)) == fmt.BF_MAGIC
        except OSError:
            ours = True  # the engine raises hnswlib's error for a missing or unreadable file
        if ours:
            return super().load_index(path, max_elements)
        vectors, labels, cap = fmt.read_bf_file(path, self.dim)
        # Stage through a fresh engine index and its own file format: load_index then replaces this index's
        # contents exactly as for a phi3fast file (an initialized index can only be replaced by a load).
        staged = _hnsw.BFIndex(self.space, self.dim)
        staged.init_index(max(cap, max_elements, len(labels)))
        try:
            if len(labels):
                staged.add_items(vectors, labels)
        except (HnswError, HnswValueError) as e:
            raise HnswError(f"Index seems to be corrupted or unsupported: {path}: {e}") from None
        with _scratch_file(path) as tmp:
            staged.save_index(tmp)
            super().load_index(tmp, max_elements)


def load_hnswlib_pickle(file: str | os.PathLike[str] | IO[bytes]) -> Any:
    """Unpickle hnswlib.Index objects (alone or inside lists, dicts, tuples) as phi3fast.hnsw.Index, without
    hnswlib installed. Other classes in the pickle are refused, so a foreign pickle cannot run code."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return fmt.load_pickle(f, Index)
    return fmt.load_pickle(file, Index)
