"""phi3fast.hnsw: recall against exact search for every space x storage, hnswlib as the oracle for results,
shapes and errors, compact-storage distances against numpy, filters, and every bad input."""

from __future__ import annotations

import re

import hnswlib
import numpy as np
import pytest

from phi3fast import _hnsw, hnsw
from phi3fast.errors import Phi3FastError

SPACES = ["l2", "ip", "cosine"]
STORAGES = ["float32", "float16", "int8"]

# One tolerance table: how far a stored vector may be from the original, per storage, relative to the vector's
# own max |x|. float32: rounding of the cosine normalization (float32 here, float64 in numpy), a few ulps;
# float16: half an ulp of an 11-bit mantissa; int8: half a step of 1/255 of the vector's range (<= 2 max|x|).
DECODE_TOL = {"float32": 8 * 2**-24, "float16": 2**-11, "int8": 1.0 / 255 + 1e-6}


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Gaussian clusters: neighbourhoods like real embeddings, so recall is a meaningful number."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) * 2
    return (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)).astype(np.float32)).astype(
        np.float32
    )


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean(
            [
                len(set(a.tolist()) & set(b.tolist())) / truth.shape[1]
                for a, b in zip(found, truth, strict=True)
            ]
        )
    )


def exact(space: str, data: np.ndarray, queries: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple:
    bf = hnsw.BFIndex(space, data.shape[1])
    bf.init_index(len(data))
    bf.add_items(data, ids)
    return bf.knn_query(queries, k=k)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("storage", STORAGES)
def test_recall_at_10_against_exact(space: str, storage: str) -> None:
    data, queries = clustered(3000, 48), clustered(100, 48, seed=1)
    ix = hnsw.Index(space, 48)
    ix.init_index(len(data), M=16, ef_construction=100, storage=storage)
    ix.add_items(data, num_threads=1)  # one thread: the same graph on every run
    # Inner product on unnormalized data is maximum-inner-product search, harder for any HNSW (hnswlib: 0.92 at
    # ef=64, 0.97 at ef=128 on this data); int8 codes blur near-ties, so it pays with twice the ef (documented).
    ix.set_ef((128 if space == "ip" else 64) * (2 if storage == "int8" else 1))
    labels, dists = ix.knn_query(queries, k=10)
    truth, _ = exact(space, data, queries, 10)
    assert labels.dtype == np.uint64 and dists.dtype == np.float32 and labels.shape == (100, 10)
    assert recall(labels, truth) >= 0.95
    assert np.all(np.diff(dists, axis=1) >= 0)
    assert ix.storage == storage


def _numpy_dist(space: str, q: np.ndarray, x: np.ndarray) -> np.ndarray:
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    if space == "cosine":
        q64 = q64 / np.linalg.norm(q64)
    if space == "l2":
        return ((x64 - q64) ** 2).sum(-1)
    return 1.0 - x64 @ q64


@pytest.mark.parametrize("simd", _hnsw.supported_simd_levels())
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dim", [1, 17, 130])
def test_compact_distances_are_exact_on_the_stored_vectors(
    simd: str, space: str, storage: str, dim: int
) -> None:
    data = clustered(200, dim, seed=dim)
    q = clustered(3, dim, seed=7)
    ix = hnsw.Index(space, dim, simd=simd)
    ix.init_index(200, M=8, ef_construction=50, storage=storage)
    ix.add_items(data)
    ix.set_ef(200)
    labels, dists = ix.knn_query(q, k=5)
    stored = ix.get_items(np.arange(200))
    ref = data / np.linalg.norm(data, axis=1, keepdims=True) if space == "cosine" else data
    err = np.abs(stored - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert err.max() <= DECODE_TOL[storage]
    for i in range(len(q)):
        want = _numpy_dist(space, q[i], stored[labels[i].astype(np.int64)])
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(dists[i], want, rtol=1e-4, atol=2e-5 * scale * max(1, dim / 16))


def test_unsupported_simd_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="SIMD level"):
        hnsw.Index("l2", 4, simd="sse9")


# ---- hnswlib as the oracle ----
@pytest.mark.parametrize("space", SPACES)
def test_same_results_as_hnswlib_when_search_is_exhaustive(space: str) -> None:
    data, queries = clustered(500, 24), clustered(20, 24, seed=3)
    ids = np.arange(1000, 1500, dtype=np.uint64)
    ours, theirs = hnsw.Index(space, 24), hnswlib.Index(space, 24)
    for ix in (ours, theirs):
        ix.init_index(600, M=16, ef_construction=200)
        ix.add_items(data, ids)
        ix.set_ef(500)  # the whole graph: both are exact, so results must agree
    (l1, d1), (l2, d2) = ours.knn_query(queries, k=7), theirs.knn_query(queries, k=7)
    assert l1.dtype == l2.dtype and d1.dtype == d2.dtype and l1.shape == l2.shape
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.get_items(ids[:5]), theirs.get_items(ids[:5]), rtol=1e-6)
    assert type(ours.get_items(ids[:2], return_type="list")) is type(
        theirs.get_items(ids[:2], return_type="list")
    )
    assert sorted(ours.get_ids_list()) == sorted(theirs.get_ids_list())
    for attr in ("space", "dim", "M", "ef_construction", "max_elements", "element_count", "ef"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.get_current_count() == theirs.get_current_count() == 500
    assert ours.get_max_elements() == theirs.get_max_elements() == 600
    # a single vector is one query row, k=0 is an empty result, as in hnswlib
    assert ours.knn_query(queries[0], k=3)[0].shape == theirs.knn_query(queries[0], k=3)[0].shape == (1, 3)
    assert ours.knn_query(queries, k=0)[0].shape == theirs.knn_query(queries, k=0)[0].shape == (20, 0)


def _both(dim: int = 8, n: int = 20, max_elements: int = 30, **kw: object) -> list:
    data = clustered(n, dim)
    out = []
    for mod in (hnsw, hnswlib):
        ix = mod.Index("l2", dim)
        ix.init_index(max_elements, **kw)
        ix.add_items(data)
        out.append(ix)
    return out


ERROR_CALLS = {
    "k larger than count": (RuntimeError, lambda ix: ix.knn_query(np.zeros(8, np.float32), k=50)),
    "data with 3 dims": (RuntimeError, lambda ix: ix.add_items(np.zeros((2, 2, 8), np.float32))),
    "wrong dim": (RuntimeError, lambda ix: ix.add_items(np.zeros((2, 5), np.float32))),
    "ids shape": (RuntimeError, lambda ix: ix.add_items(np.zeros((2, 8), np.float32), ids=[1])),
    "capacity": (
        RuntimeError,
        lambda ix: ix.add_items(np.ones((11, 8), np.float32), ids=np.arange(100, 111)),
    ),
    "negative id": (OverflowError, lambda ix: ix.add_items(np.zeros((1, 8), np.float32), ids=[-1])),
    "mark unknown": (RuntimeError, lambda ix: ix.mark_deleted(12345)),
    "unmark live": (RuntimeError, lambda ix: ix.unmark_deleted(3)),
    "get unknown": (RuntimeError, lambda ix: ix.get_items([12345])),
    "get scalar": (ValueError, lambda ix: ix.get_items(3)),
    "bad return_type": (ValueError, lambda ix: ix.get_items([1], return_type="tuple")),
    "replace not allowed": (
        RuntimeError,
        lambda ix: ix.add_items(np.zeros((1, 8), np.float32), replace_deleted=True),
    ),
    "resize below count": (RuntimeError, lambda ix: ix.resize_index(5)),
    "init twice": (RuntimeError, lambda ix: ix.init_index(10)),
    "negative k": (TypeError, lambda ix: ix.knn_query(np.zeros(8, np.float32), k=-1)),
    "set M": (AttributeError, lambda ix: setattr(ix, "M", 3)),
}


@pytest.mark.parametrize("name", list(ERROR_CALLS))
def test_errors_match_hnswlib(name: str) -> None:
    exc, call = ERROR_CALLS[name]
    ours, theirs = _both()
    with pytest.raises(exc) as theirs_err:
        call(theirs)
    with pytest.raises(exc) as ours_err:
        call(ours)
    # same message start as hnswlib, up to the first number (ours may add what and where, and print shapes
    # where hnswlib prints the array's ndim)
    head = re.split(r"[:.\d]", str(theirs_err.value))[0]
    if exc is RuntimeError or exc is ValueError:
        assert str(ours_err.value).startswith(head), (str(ours_err.value), str(theirs_err.value))
    if exc is not AttributeError and exc is not TypeError:
        assert isinstance(ours_err.value, Phi3FastError)


def test_capacity_error_adds_nothing() -> None:
    ours, theirs = _both()
    with pytest.raises(RuntimeError):
        ours.add_items(np.ones((11, 8), np.float32), ids=np.arange(100, 111))
    assert ours.get_current_count() == 20  # hnswlib adds 10 of the 11 before raising; we refuse the batch


def test_deleted_items_match_hnswlib() -> None:
    ours, theirs = _both()
    for ix in (ours, theirs):
        ix.mark_deleted(3)
        with pytest.raises(RuntimeError, match="already deleted"):
            ix.mark_deleted(3)
        with pytest.raises(RuntimeError, match="Label not found"):
            ix.get_items([3])
        ix.set_ef(30)
    q = clustered(20, 8)[3]
    assert 3 not in ours.knn_query(q, k=5)[0] and 3 not in theirs.knn_query(q, k=5)[0]
    ours.unmark_deleted(3)
    assert ours.knn_query(q, k=1)[0][0, 0] == 3


def test_repr_and_properties_before_init() -> None:
    ix = hnsw.Index("cosine", 16)
    assert repr(ix) == "<phi3fast.hnsw.Index(space='cosine', dim=16, storage='float32')>"
    assert (ix.ef, ix.M, ix.max_elements, ix.element_count, ix.ef_construction) == (10, 0, 0, 0, 0)
    assert ix.num_threads >= 1


# ---- bad input: hnswlib crashes or silently misbehaves on these; we raise ----
BAD_CALLS = {
    "query before init": (
        RuntimeError,
        lambda: hnsw.Index("l2", 4).knn_query(np.zeros(4, np.float32)),
        "not initialized",
    ),
    "count before init": (RuntimeError, lambda: hnsw.Index("l2", 4).get_current_count(), "not initialized"),
    "unknown space": (RuntimeError, lambda: hnsw.Index("hamming", 4), "Space name"),
    "unknown storage": (ValueError, lambda: hnsw.Index("l2", 4).init_index(10, storage="int4"), "storage"),
    "bad dim": (ValueError, lambda: hnsw.Index("l2", 0), "dim"),
    "M too small": (ValueError, lambda: hnsw.Index("l2", 4).init_index(10, M=1), "M must be"),
    "huge capacity": (RuntimeError, lambda: hnsw.Index("l2", 4096).init_index(2**31), "memory"),
    "BF query before init": (
        RuntimeError,
        lambda: hnsw.BFIndex("l2", 4).knn_query(np.zeros(4)),
        "not initialized",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_calls_raise(name: str) -> None:
    exc, call, msg = BAD_CALLS[name]
    with pytest.raises(exc, match=msg) as err:
        call()
    assert isinstance(err.value, Phi3FastError)


@pytest.fixture
def small() -> hnsw.Index:
    ix = hnsw.Index("l2", 8)
    ix.init_index(50)
    ix.add_items(clustered(20, 8))
    return ix


@pytest.mark.parametrize(
    "data, exc, msg",
    [
        (np.full((1, 8), np.nan, np.float32), ValueError, "NaN or infinity"),
        (np.full((2, 8), np.inf), ValueError, r"NaN or infinity \(row 0\)"),
        (np.zeros((1, 8), np.complex64), TypeError, "complex"),
        (np.array([["a"] * 8]), TypeError, "real numeric"),
        (np.zeros((1, 9), np.float32), RuntimeError, "Wrong dimensionality of the vectors: data has 9"),
    ],
)
def test_bad_vectors_raise_for_add_and_query(
    small: hnsw.Index, data: np.ndarray, exc: type, msg: str
) -> None:
    with pytest.raises(exc, match=msg):
        small.add_items(data, ids=[99] * len(data))
    with pytest.raises(exc, match=msg):
        small.knn_query(data)
    assert small.get_current_count() == 20


def test_float16_storage_refuses_values_it_cannot_hold() -> None:
    ix = hnsw.Index("l2", 4)
    ix.init_index(10, storage="float16")
    with pytest.raises(ValueError, match="float16"):
        ix.add_items(np.array([[1.0, 2.0, 7e4, 0.0]]))
    assert ix.get_current_count() == 0


def test_float64_and_int_input_are_converted(small: hnsw.Index) -> None:
    x = np.arange(8, dtype=np.float64)
    small.add_items(x, ids=[40])
    small.add_items([list(range(8, 16))], ids=np.array([41], np.uint32))
    np.testing.assert_array_equal(small.get_items([40, 41]), np.arange(16, dtype=np.float32).reshape(2, 8))
    assert small.knn_query(x.tolist(), k=1)[0][0, 0] == 40


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_resize_keeps_vectors_and_graph(storage: str) -> None:
    # resize_index moves the link, vector and label arrays to a new mapping (csrc/hnsw/memory.h)
    data = clustered(400, 17)
    ix = hnsw.Index("l2", 17)
    ix.init_index(400, M=8, ef_construction=60, storage=storage)
    ix.add_items(data)
    ix.set_ef(40)
    before = ix.knn_query(data[:50], k=5)
    items = ix.get_items(np.arange(400))
    ix.resize_index(5000)
    after = ix.knn_query(data[:50], k=5)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(ix.get_items(np.arange(400)), items)
    more = clustered(600, 17, seed=4)
    ix.add_items(more, ids=np.arange(400, 1000))
    assert ix.get_current_count() == 1000 and ix.get_max_elements() == 5000
    truth, _ = exact("l2", np.concatenate([data, more]), more[:50], 10)
    assert recall(ix.knn_query(more[:50], k=10)[0], truth) >= 0.95


def test_readd_updates_the_vector(small: hnsw.Index) -> None:
    v = np.full(8, 30.0, np.float32)
    small.add_items(v, ids=[5])
    assert small.get_current_count() == 20
    np.testing.assert_array_equal(small.get_items([5])[0], v)
    small.set_ef(20)
    assert small.knn_query(v, k=1)[0][0, 0] == 5


def test_bfindex_matches_hnswlib_bfindex() -> None:
    data, q = clustered(300, 12), clustered(10, 12, seed=2)
    ours, theirs = hnsw.BFIndex("ip", 12), hnswlib.BFIndex("ip", 12)
    for ix in (ours, theirs):
        ix.init_index(400)
        ix.add_items(data)
        ix.delete_vector(7)
    (l1, d1), (l2, d2) = ours.knn_query(q, k=5), theirs.knn_query(q, k=5)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)
    assert ours.get_current_count() == theirs.get_current_count() == 299
    with pytest.raises(RuntimeError, match="Cannot return"):  # hnswlib returns uninitialized labels here
        ours.knn_query(q, k=300)
    with pytest.raises(RuntimeError, match="Label not found"):  # hnswlib silently ignores an unknown id
        ours.delete_vector(7)


@pytest.mark.parametrize("kind", ["ids", "mask", "callable"])
def test_bfindex_filters_match_hnswlib_bfindex(kind: str) -> None:
    data, q = clustered(300, 17), clustered(9, 17, seed=3)
    ours, theirs = hnsw.BFIndex("l2", 17), hnswlib.BFIndex("l2", 17)
    for ix in (ours, theirs):
        ix.init_index(400)
        ix.add_items(data)
        ix.delete_vector(150)  # moves the last vector into the hole: the id bitset must follow positions
        ix.delete_vector(7)
    allowed = np.arange(0, 300, 3)  # 150 is among them, deleted: it must not come back
    allowed_set = set(allowed.tolist())
    mask = np.zeros(300, bool)
    mask[allowed] = True
    filt = {"ids": allowed, "mask": mask, "callable": lambda label: label in allowed_set}[kind]
    l1, d1 = ours.knn_query(q, k=5, filter=filt, num_threads=2)
    l2, d2 = theirs.knn_query(q, k=5, filter=lambda label: label in allowed_set)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)
    assert 150 not in l1


# ---- filters ----
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("kind", ["ids", "mask", "callable"])
def test_filters_keep_recall(fraction: float, kind: str) -> None:
    n, dim = 4000, 32
    data, queries = clustered(n, dim), clustered(50, dim, seed=5)
    rng = np.random.default_rng(int(fraction * 100))
    allowed = np.sort(rng.choice(n, int(n * fraction), replace=False))
    ix = hnsw.Index("l2", dim)
    ix.init_index(n, M=16, ef_construction=100)
    ix.add_items(data)
    ix.set_ef(64)
    allowed_set = set(allowed.tolist())
    if kind == "ids":
        filt: object = allowed
    elif kind == "mask":
        filt = np.zeros(n, bool)
        filt[allowed] = True
    else:
        filt = lambda label: label in allowed_set  # noqa: E731
    labels, _ = ix.knn_query(queries, k=10, filter=filt)
    assert set(labels.ravel().tolist()) <= allowed_set
    truth, _ = exact("l2", data[allowed], queries, 10, ids=allowed)
    assert recall(labels, truth) >= 0.95


def test_filter_errors_and_exceptions_propagate(small: hnsw.Index) -> None:
    def boom(label: int) -> bool:
        raise KeyError("from the filter")

    with pytest.raises(KeyError, match="from the filter"):
        small.knn_query(clustered(50, 8), k=2, filter=boom, num_threads=2)
    with pytest.raises(RuntimeError, match="Cannot return"):
        small.knn_query(clustered(2, 8), k=5, filter=np.array([1, 2]))
    with pytest.raises(TypeError, match="filter"):
        small.knn_query(clustered(2, 8), k=1, filter=np.array([0.5]))
    assert small.knn_query(clustered(1, 8), k=2, filter=np.array([3, 4, 999]))[0].tolist()[0] in (
        [3, 4],
        [4, 3],
    )
