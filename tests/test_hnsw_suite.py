"""Behaviours hnswlib's own Python suite (tests/python/bindings_test*.py) checks, held here with hnswlib as the
oracle: labels straight from knn_query into get_items, lazy Python filters, exact answers where ef covers the
index (the 'ip' pickle case), and the filtered graph walk's recall."""

from __future__ import annotations

import pickle

import hnswlib
import numpy as np
import pytest

from phi3fast import hnsw


def uniform(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, dim), dtype=np.float32)


def brute_force(space: str, data: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = q.astype(np.float64), data.astype(np.float64)
    if space == "ip":
        d = 1.0 - a @ b.T
    elif space == "cosine":
        d = (
            1.0
            - (a / np.linalg.norm(a, axis=1, keepdims=True))
            @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
        )
    else:
        d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


def test_get_items_takes_knn_query_labels_as_they_are() -> None:
    data = uniform(500, 16, seed=1)
    ours, theirs = hnsw.Index("l2", 16), hnswlib.Index("l2", 16)
    for ix in (ours, theirs):
        ix.init_index(500, ef_construction=100, M=16)
        ix.add_items(data)
        ix.set_ef(100)
    labels, _ = ours.knn_query(data[:50], k=1)  # shape (50, 1)
    assert labels.shape == (50, 1)
    np.testing.assert_array_equal(ours.get_items(labels), theirs.get_items(labels))
    np.testing.assert_array_equal(ours.get_items(labels), data[labels.ravel()])
    # any shape of labels is read in order
    labels3, _ = ours.knn_query(data[:7], k=3)
    np.testing.assert_array_equal(ours.get_items(labels3), data[labels3.ravel()])
    assert ours.get_items(labels3, return_type="list") == data[labels3.ravel()].tolist()


def test_ids_of_the_wrong_shape_name_both_shapes() -> None:
    ix = hnsw.Index("l2", 4)
    ix.init_index(10)
    with pytest.raises(RuntimeError, match=r"shape \(3, 1\) does not match .*\(3 rows\)"):
        ix.add_items(np.zeros((3, 4), np.float32), ids=np.arange(3).reshape(3, 1))
    with pytest.raises(RuntimeError, match=r"shape \(2,\) does not match .*\(3 rows\)"):
        ix.add_items(np.zeros((3, 4), np.float32), ids=[1, 2])


def test_bfindex_calls_a_python_filter_only_for_top_k_candidates() -> None:
    data, q = uniform(3000, 16, seed=2), uniform(40, 16, seed=3)
    ours, theirs = hnsw.BFIndex("l2", 16), hnswlib.BFIndex("l2", 16)
    calls = {"ours": 0, "theirs": 0}

    def counting(who: str):  # noqa: ANN202
        def allow(label: int) -> bool:
            calls[who] += 1
            return label % 2 == 0

        return allow

    for ix in (ours, theirs):
        ix.init_index(3000)
        ix.add_items(data)
    l1, d1 = ours.knn_query(q, k=5, filter=counting("ours"), num_threads=1)
    l2, d2 = theirs.knn_query(q, k=5, filter=counting("theirs"))
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-6)
    assert (l1 % 2 == 0).all()
    # hnswlib asks about a candidate only when its distance would enter the top k: far fewer than every element
    # (it also skips some while its heap is not yet full, so its count is a little lower still)
    assert calls["ours"] < 1.2 * calls["theirs"] and calls["ours"] < len(q) * len(data) // 20, calls


@pytest.mark.parametrize("seed", [1, 18, 19])
def test_ip_with_ef_covering_the_index_is_exact_through_pickle(seed: int) -> None:
    # hnswlib's bindings_test_pickle in 'ip' (dim 16, M=32, ef=400, 1000 points, k=25): on these seeds the
    # 'ip' graph leaves true neighbours unreachable for the walk, in hnswlib too (it is recall, not the
    # pickle). With ef at a quarter of the index or more, the search scans exactly instead.
    rng = np.random.default_rng(seed)
    data, q = rng.random((1000, 16), dtype=np.float32), rng.random((100, 16), dtype=np.float32)
    ix = hnsw.Index("ip", 16)
    ix.init_index(1000, ef_construction=200, M=32)
    ix.num_threads = 4
    ix.add_items(data)
    ix.ef = 400
    truth_l, truth_d = brute_force("ip", data, q, 25)
    for index in (ix, pickle.loads(pickle.dumps(ix))):
        labels, dists = index.knn_query(q, k=25)
        assert int(np.sum((truth_d - dists) ** 2 > 1e-3)) == 0
        assert all(set(a) == set(b) for a, b in zip(labels.tolist(), truth_l.tolist(), strict=True))


@pytest.mark.parametrize("fraction", [0.2, 0.5])
@pytest.mark.parametrize("kind", ["ids", "mask", "callable"])
def test_filtered_graph_walk_keeps_recall_like_hnswlib(fraction: float, kind: str) -> None:
    # Chosen so the graph walk runs, not the exact scan: allowed*20 >= n, allowed > 32*max(ef, k) and
    # 4*ef < n (hnsw_search.h). The callable's call count shows the walk visited a small part of the index.
    n, dim, ef, k = 8000, 24, 40, 10
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((60, dim)).astype(np.float32) * 2
    data = (centres[rng.integers(0, 60, n)] + rng.standard_normal((n, dim))).astype(np.float32)
    q = (centres[rng.integers(0, 60, 100)] + rng.standard_normal((100, dim))).astype(np.float32)
    allowed = np.sort(rng.choice(n, int(n * fraction), replace=False))
    assert len(allowed) * 20 >= n and len(allowed) > 32 * max(ef, k) and 4 * ef < n
    allowed_set = set(allowed.tolist())
    ours, theirs = hnsw.Index("l2", dim), hnswlib.Index("l2", dim)
    for ix in (ours, theirs):
        ix.init_index(n, M=16, ef_construction=100)
        ix.add_items(data)
        ix.set_ef(ef)
    calls = [0]

    def allow(label: int) -> bool:
        calls[0] += 1
        return label in allowed_set

    mask = np.zeros(n, bool)
    mask[allowed] = True
    filt = {"ids": allowed, "mask": mask, "callable": allow}[kind]
    found, _ = ours.knn_query(q, k=k, filter=filt, num_threads=1)
    theirs_found, _ = theirs.knn_query(q, k=k, filter=lambda label: label in allowed_set, num_threads=1)
    truth, _ = brute_force("l2", data[allowed], q, k)
    truth = allowed[truth]

    def recall(labels: np.ndarray) -> float:
        return float(
            np.mean([len(set(a) & set(b)) / k for a, b in zip(labels.tolist(), truth.tolist(), strict=True)])
        )

    assert set(found.ravel().tolist()) <= allowed_set
    ours_r, theirs_r = recall(found), recall(theirs_found)
    assert ours_r >= 0.95 and ours_r >= theirs_r - 0.01, (ours_r, theirs_r)
    if kind == "callable":
        assert calls[0] < len(q) * n // 4, calls[0]
