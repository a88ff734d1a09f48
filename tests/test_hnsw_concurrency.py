"""Index concurrency: automatic labels, filters against a growing index, copies and loads while other threads
search, and a bounded churn (adder, two queriers, deleter) whose final recall matches a fresh build.

Runs that could deadlock or crash the interpreter when broken go in a child process, so a regression fails
the test instead of hanging or killing the suite; the child's timeout is a deadlock detector, not a timing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from phi3fast import hnsw

DIM = 16
CHILD_TIMEOUT = 300  # generous: a healthy child takes a few seconds, a deadlocked one never ends


def points(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((30, DIM)).astype(np.float32) * 2
    return (centres[rng.integers(0, 30, n)] + rng.standard_normal((n, DIM))).astype(np.float32)


def run_child(code: str) -> str:
    prelude = textwrap.dedent(
        """
        import threading
        import numpy as np
        from phi3fast import hnsw
        def points(n, seed, dim=16):
            rng = np.random.default_rng(seed)
            return rng.standard_normal((n, dim)).astype(np.float32)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout


def _add_concurrently(ix: hnsw.Index | hnsw.BFIndex, batches: list[np.ndarray]) -> None:
    start = threading.Barrier(len(batches))
    errors: list[BaseException] = []

    def add(x: np.ndarray) -> None:
        try:
            start.wait()
            ix.add_items(x)
        except BaseException as e:  # noqa: BLE001 - surfaced by the main thread
            errors.append(e)

    threads = [threading.Thread(target=add, args=(x,)) for x in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


@pytest.mark.parametrize("cls", ["Index", "BFIndex"])
def test_concurrent_add_items_without_ids_get_distinct_labels(cls: str) -> None:
    n = 3000
    batches = [points(n, seed=s) for s in (1, 2, 3)]
    ix = getattr(hnsw, cls)("l2", DIM)
    if cls == "Index":
        ix.init_index(3 * n, ef_construction=40)
    else:
        ix.init_index(3 * n)
    _add_concurrently(ix, batches)
    assert ix.get_current_count() == 3 * n
    if cls == "BFIndex":  # exact: every row finds itself under a label of its own
        labels, dists = ix.knn_query(np.concatenate(batches), k=1)
        assert len(set(labels.ravel().tolist())) == 3 * n and np.allclose(dists, 0)
        return
    assert sorted(ix.get_ids_list()) == list(range(3 * n))
    # each batch got one contiguous block of labels, in whichever order the threads took them
    stored = ix.get_items(np.arange(3 * n))
    for x in batches:
        first = int(np.flatnonzero((stored == x[0]).all(axis=1))[0])
        np.testing.assert_array_equal(stored[first : first + n], x)


def test_automatic_labels_are_kept_when_a_batch_is_refused() -> None:
    ix = hnsw.Index("l2", DIM)
    ix.init_index(10)
    ix.add_items(points(6, seed=1))
    try:
        ix.add_items(points(5, seed=2))
        raise AssertionError("a batch over capacity must be refused")
    except RuntimeError:
        pass
    ix.add_items(points(4, seed=3))
    assert sorted(ix.get_ids_list()) == list(range(10))


def test_filter_bitset_against_concurrent_resize_and_add() -> None:
    # The filter is resolved once per knn_query against the index's capacity then; a concurrent resize_index
    # plus add_items makes later rows of the same query see nodes past its bitset.
    out = run_child(
        """
        ix = hnsw.Index("l2", 16)
        ix.init_index(64, ef_construction=20)
        ix.add_items(points(64, seed=1))
        allowed = np.arange(0, 64, 2)
        allowed_set = set(allowed.tolist())
        q = points(200_000, seed=2)  # a long query: the resize and add land between its rows
        bad = []
        for round_ in range(6):
            started = threading.Event()
            def query():
                started.set()
                labels, _ = ix.knn_query(q, k=3, filter=allowed, num_threads=1)
                bad.extend(set(labels.ravel().tolist()) - allowed_set)
            t = threading.Thread(target=query)
            t.start()
            started.wait()
            cap = ix.get_max_elements()
            ix.resize_index(cap + 1000)
            ix.add_items(points(1000, seed=10 + round_), np.arange(cap, cap + 1000), num_threads=1)
            t.join()
        assert not bad, sorted(set(bad))[:10]
        print("ok", ix.get_current_count())
        """
    )
    assert out.startswith("ok")


def test_bfindex_filter_against_concurrent_deletes() -> None:
    # BFIndex's id filter is a bitset over positions, and delete_vector moves the last vector into the hole:
    # a query running across deletes must not return the moved (disallowed) labels from allowed positions.
    n = 4000
    x = points(n, seed=31)
    bf = hnsw.BFIndex("l2", DIM)
    bf.init_index(n)
    bf.add_items(x)
    allowed = np.arange(0, n, 2)
    allowed_set = set(allowed.tolist())
    q = np.tile(x[n - 1 :: -2][:500], (40, 1))  # odd labels from the end: the ones deletes move into holes
    bad: list[int] = []
    gone = list(range(0, 1000, 2))
    for round_ in range(5):  # each round: one long query, 100 deletes landing between its rows
        started = threading.Event()

        def query(started: threading.Event = started) -> None:
            started.set()
            labels, _ = bf.knn_query(q, k=1, filter=allowed, num_threads=1)
            bad.extend(set(labels.ravel().tolist()) - allowed_set)

        t = threading.Thread(target=query)
        t.start()
        started.wait()
        for label in gone[100 * round_ : 100 * (round_ + 1)]:
            bf.delete_vector(label)
        t.join(timeout=120)
    assert not bad, sorted(bad)[:10]
    labels, _ = bf.knn_query(q[:500], k=1, filter=allowed)
    assert set(labels.ravel().tolist()) <= allowed_set - set(gone)


def test_id_filter_against_concurrent_replace_deleted() -> None:
    # An allow-list may still name deleted labels; add_items(replace_deleted=True) gives their slots new labels
    # during a running query. The new labels are not allowed and must not come back.
    n = 2000
    x = points(n, seed=41)
    ix = hnsw.Index("l2", DIM)
    ix.init_index(n, ef_construction=40, allow_replace_deleted=True)
    ix.add_items(x)
    ix.set_ef(20)
    gone = np.arange(0, 1000, 2)
    for label in gone.tolist():
        ix.mark_deleted(label)
    allowed = np.arange(0, n, 2)  # names the deleted labels too
    allowed_set = set(allowed.tolist())
    fresh = points(len(gone), seed=42)
    q = np.tile(fresh, (20, 1))  # each new vector is its own query's nearest neighbour
    bad: list[int] = []
    for round_ in range(5):
        started = threading.Event()

        def query(started: threading.Event = started) -> None:
            started.set()
            labels, _ = ix.knn_query(q, k=1, filter=allowed, num_threads=1)
            bad.extend(set(labels.ravel().tolist()) - allowed_set)

        t = threading.Thread(target=query)
        t.start()
        started.wait()
        chunk = slice(100 * round_, 100 * (round_ + 1))
        ix.add_items(fresh[chunk], 10_000 + np.arange(len(gone))[chunk], replace_deleted=True, num_threads=1)
        t.join(timeout=120)
    assert not bad, sorted(bad)[:10]


def test_copy_while_a_filtered_query_runs_does_not_deadlock() -> None:
    # Index(index) snapshots the graph under the index's exclusive lock; a filtered query holds the shared lock
    # and needs the GIL for each Python filter call, so the copy must wait without holding the GIL.
    out = run_child(
        """
        ix = hnsw.Index("l2", 16)
        ix.init_index(3000, ef_construction=40)
        ix.add_items(points(3000, seed=1))
        inside = threading.Event()
        def allow(label):
            inside.set()
            return label % 2 == 0
        result = []
        t = threading.Thread(
            target=lambda: result.append(ix.knn_query(points(4000, seed=2), k=3, filter=allow, num_threads=1))
        )
        t.start()
        inside.wait()
        copies = [hnsw.Index(ix) for _ in range(5)]
        t.join()
        labels = result[0][0]
        assert (labels % 2 == 0).all()
        assert all(c.get_current_count() == 3000 for c in copies)
        print("ok")
        """
    )
    assert out.startswith("ok")


def test_load_index_while_other_threads_search() -> None:
    # load_index swaps in a new graph; threads already searching the old one (GIL released) keep it alive.
    out = run_child(
        """
        import os, tempfile
        x = points(6000, seed=1)
        ix = hnsw.Index("l2", 16)
        ix.init_index(6000, ef_construction=40)
        ix.add_items(x)
        ix.set_ef(50)  # kept by the Python object across loads
        path = os.path.join(tempfile.mkdtemp(), "ix.bin")
        ix.save_index(path)
        stop = threading.Event()
        errors = []
        def search(seed):
            q = x[np.random.default_rng(seed).integers(0, 6000, 400)]
            try:
                for _ in range(40):
                    labels, dists = ix.knn_query(q, k=1, num_threads=1)
                    assert labels.max() < 6000 and np.isfinite(dists).all()
                    if stop.is_set():
                        break
            except BaseException as e:
                errors.append(e)
        threads = [threading.Thread(target=search, args=(s,)) for s in (2, 3)]
        for t in threads:
            t.start()
        for _ in range(25):
            ix.load_index(path)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        labels, _ = ix.knn_query(x[:500], k=1)
        assert np.mean(labels.ravel() == np.arange(500)) > 0.99
        print("ok")
        """
    )
    assert out.startswith("ok")


def test_churn_keeps_results_correct_and_recall_of_a_fresh_build() -> None:
    """One adder, two queriers and a deleter, each a bounded loop. No query may return a label deleted before
    it started; the final index must find the survivors as well as a fresh build of them (same parameters)."""
    M, EFC, EF, K = 16, 100, 64, 10
    batches, batch = 12, 300
    x = points(batches * batch, seed=11)
    ix = hnsw.Index("l2", DIM)
    ix.init_index(len(x), M=M, ef_construction=EFC)
    ix.set_ef(EF)
    ix.add_items(x[:batch], np.arange(batch))
    lock = threading.Condition()
    added, deleted = batch, set()  # labels [0, added) were added; `deleted` were marked deleted
    adder_done = threading.Event()
    errors: list[BaseException] = []
    rng = np.random.default_rng(12)

    def adder() -> None:
        nonlocal added
        try:
            for b in range(1, batches):
                ix.add_items(
                    x[b * batch : (b + 1) * batch], np.arange(b * batch, (b + 1) * batch), num_threads=1
                )
                with lock:
                    added = (b + 1) * batch
                    lock.notify_all()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            adder_done.set()
            with lock:
                lock.notify_all()

    def deleter() -> None:
        try:
            for _ in range(40):
                with lock:  # keep at least half of what was added alive: wait for the adder if needed
                    lock.wait_for(lambda: added - len(deleted) > added // 2 + 15 or adder_done.is_set(), 120)
                    live = sorted(set(range(added)) - deleted)
                if len(live) <= added // 2 + 15:
                    break
                for label in rng.choice(live, 15, replace=False).tolist():
                    ix.mark_deleted(label)
                    with lock:
                        deleted.add(label)
                if adder_done.is_set():
                    break
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def querier(seed: int) -> None:
        q = points(20, seed=seed)
        try:
            for _ in range(300):
                with lock:
                    gone, top = set(deleted), added
                labels, dists = ix.knn_query(q, k=K, num_threads=1)
                found = set(labels.ravel().tolist())
                assert not (found & gone), sorted(found & gone)
                assert max(found) < len(x) and np.isfinite(dists).all()
                assert top <= len(x)
                if adder_done.is_set():
                    break
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=adder), threading.Thread(target=deleter)]
    threads += [threading.Thread(target=querier, args=(s,)) for s in (21, 22)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    survivors = np.array(sorted(set(range(len(x))) - deleted))
    assert len(deleted) > 0 and ix.get_current_count() == len(x)
    fresh = hnsw.Index("l2", DIM)
    fresh.init_index(len(survivors), M=M, ef_construction=EFC)
    fresh.set_ef(EF)
    fresh.add_items(x[survivors], survivors)
    queries = points(300, seed=23)
    bf = hnsw.BFIndex("l2", DIM)
    bf.init_index(len(survivors))
    bf.add_items(x[survivors], survivors)
    truth, _ = bf.knn_query(queries, k=K)

    def recall(index: hnsw.Index) -> float:
        found, _ = index.knn_query(queries, k=K)
        assert not set(found.ravel().tolist()) & deleted
        return float(
            np.mean([len(set(a) & set(b)) / K for a, b in zip(found.tolist(), truth.tolist(), strict=True)])
        )

    churned, rebuilt = recall(ix), recall(fresh)
    assert churned >= 0.95 and churned >= rebuilt - 0.02, (churned, rebuilt)
