"""Updates: delete/replace churn keeps recall, concurrent add_items + knn_query from several threads is safe."""

from __future__ import annotations

import threading

import hnswlib
import numpy as np
import pytest

from phi3fast import hnsw

DIM = 24


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((30, DIM)).astype(np.float32) * 2
    return (centres[rng.integers(0, 30, n)] + rng.standard_normal((n, DIM))).astype(np.float32)


def recall_vs_exact(ix: hnsw.Index, live: dict[int, np.ndarray], queries: np.ndarray, k: int = 10) -> float:
    ids = np.fromiter(live.keys(), dtype=np.uint64)
    bf = hnsw.BFIndex("l2", DIM)
    bf.init_index(len(ids))
    bf.add_items(np.stack(list(live.values())), ids)
    truth, _ = bf.knn_query(queries, k=k)
    found, _ = ix.knn_query(queries, k=k)
    assert set(found.ravel().tolist()) <= set(live)
    return float(
        np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(found, truth, strict=True)])
    )


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_churn_with_replace_deleted_keeps_recall(storage: str) -> None:
    n, rounds, frac = 2000, 4, 0.25
    ix = hnsw.Index("l2", DIM)
    ix.init_index(n, M=16, ef_construction=100, allow_replace_deleted=True, storage=storage)
    x = clustered(n, seed=1)
    ix.add_items(x, np.arange(n), num_threads=1)
    ix.set_ef(64 if storage == "float32" else 128)
    live = {i: x[i] for i in range(n)}
    queries = clustered(100, seed=2)
    start = recall_vs_exact(ix, live, queries)
    rng = np.random.default_rng(3)
    next_id = n
    for r in range(rounds):
        gone = rng.choice(np.fromiter(live.keys(), dtype=np.int64), int(n * frac), replace=False)
        for g in gone:
            ix.mark_deleted(int(g))
            del live[int(g)]
        fresh = clustered(len(gone), seed=10 + r)
        new_ids = np.arange(next_id, next_id + len(gone))
        next_id += len(gone)
        ix.add_items(fresh, new_ids, replace_deleted=True, num_threads=1)
        live.update({int(i): v for i, v in zip(new_ids, fresh, strict=True)})
        assert ix.get_current_count() == n  # every deleted slot was reused: no growth
        with pytest.raises(RuntimeError, match="Label not found"):
            ix.get_items([int(gone[0])])
        got = recall_vs_exact(ix, live, queries)
        assert got >= 0.95 and got >= start - 0.02, (r, got, start)


def test_replace_deleted_rules_match_hnswlib() -> None:
    x = clustered(50, seed=4)
    for mod in (hnsw, hnswlib):
        ix = mod.Index("l2", DIM)
        ix.init_index(50, allow_replace_deleted=True)
        ix.add_items(x)
        ix.mark_deleted(3)
        with pytest.raises(RuntimeError, match="Can't use addPoint to update deleted elements"):
            ix.add_items(x[3], ids=[3])
        with pytest.raises(RuntimeError, match="exceeds the specified limit"):
            ix.add_items(x[:2], ids=[100, 101], replace_deleted=True)  # one vacant slot, two new ids
        ix.add_items(x[3] + 1, ids=[100], replace_deleted=True)
        assert ix.get_current_count() == 50
        assert sorted(ix.get_ids_list()) == sorted([*range(3), *range(4, 50), 100])


def test_concurrent_add_and_query_from_threads() -> None:
    n, chunk = 4000, 250
    x = clustered(n, seed=5)
    ix = hnsw.Index("l2", DIM)
    ix.init_index(n, M=16, ef_construction=80)
    ix.add_items(x[:chunk])
    ix.set_ef(64)
    errors: list[BaseException] = []
    done = threading.Event()
    added = [chunk]  # rows [0, added[0]) are fully added when read by a reader

    def writer() -> None:
        try:
            for s in range(chunk, n, chunk):
                ix.add_items(x[s : s + chunk], np.arange(s, s + chunk), num_threads=2)
                added[0] = s + chunk
        except BaseException as e:  # noqa: BLE001 - surfaced by the main thread
            errors.append(e)
        finally:
            done.set()

    def reader(seed: int) -> None:
        q = clustered(20, seed=seed)
        try:
            while not done.is_set():
                before = added[0]
                labels, dists = ix.knn_query(q, k=5, num_threads=1)
                assert labels.max() < n and np.isfinite(dists).all()
                # anything fully added before this query started can be filtered to, exactly
                allowed = np.arange(before, dtype=np.uint64)
                assert set(ix.knn_query(q[:2], k=3, filter=allowed)[0].ravel().tolist()) <= set(range(before))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in (6, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert ix.get_current_count() == n
    live = {i: x[i] for i in range(n)}
    assert recall_vs_exact(ix, live, clustered(100, seed=8)) >= 0.95


def test_concurrent_mark_deleted_while_querying() -> None:
    x = clustered(2000, seed=9)
    ix = hnsw.Index("cosine", DIM)
    ix.init_index(2000)
    ix.add_items(x)
    ix.set_ef(50)
    errors: list[BaseException] = []

    def deleter() -> None:
        try:
            for i in range(0, 2000, 4):
                ix.mark_deleted(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=deleter)
    t.start()
    q = clustered(50, seed=10)
    while t.is_alive():
        ix.knn_query(q, k=5, num_threads=2)
    t.join()
    assert not errors
    labels, _ = ix.knn_query(q, k=5)
    assert not (labels % 4 == 0).any()
