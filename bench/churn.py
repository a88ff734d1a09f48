"""Churn: one adder, two queriers and a deleter on one index for a while, phi3fast.hnsw and hnswlib on the same work.

    python bench/churn.py                 # 20 s per library, 40k x 64 vectors
    python bench/churn.py --seconds 5     # shorter

During the run every query checks that no label deleted before it started comes back. Afterwards the index's
recall@10 on the survivors is compared with a fresh build of exactly those vectors (same M, ef_construction, ef).
Prints queries run, violations, calls that raised for finding fewer than k live neighbours, both recalls and
their difference per library; writes bench/results/churn.json.
tests/test_hnsw_concurrency.py runs a short bounded version of this as a test.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_rows  # noqa: E402

from phi3fast import hnsw  # noqa: E402

M, EFC, EF, K, DIM = 16, 100, 64, 10, 64


def points(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((200, DIM)).astype(np.float32) * 2
    return (centres[rng.integers(0, 200, n)] + rng.standard_normal((n, DIM))).astype(np.float32)


def recall(ix: Any, x: np.ndarray, survivors: np.ndarray, q: np.ndarray) -> float:
    bf = hnsw.BFIndex("l2", DIM)
    bf.init_index(len(survivors))
    bf.add_items(x[survivors], survivors)
    truth, _ = bf.knn_query(q, k=K)
    found, _ = ix.knn_query(q, k=K)
    return float(
        np.mean([len(set(a) & set(b)) / K for a, b in zip(found.tolist(), truth.tolist(), strict=True)])
    )


def churn(mod: Any, x: np.ndarray, seconds: float, batch: int) -> dict[str, Any]:
    ix = mod.Index("l2", DIM)
    ix.init_index(len(x), M=M, ef_construction=EFC)
    ix.set_ef(EF)
    ix.add_items(x[: 4 * batch], np.arange(4 * batch))
    lock = threading.Lock()
    state = {"added": 4 * batch, "queries": 0, "violations": 0, "short": 0}
    deleted: set[int] = set()
    stop = threading.Event()
    rng = np.random.default_rng(1)

    def adder() -> None:
        while not stop.is_set() and state["added"] + batch <= len(x):
            s = state["added"]
            ix.add_items(x[s : s + batch], np.arange(s, s + batch), num_threads=1)
            with lock:
                state["added"] = s + batch

    def deleter() -> None:
        while not stop.is_set():
            with lock:
                live = state["added"] - len(deleted)
                top = state["added"]
            if live <= top // 2:  # keep at least half alive: wait for the adder
                time.sleep(0.01)
                continue
            label = int(rng.integers(0, top))
            if label in deleted:
                continue
            ix.mark_deleted(label)
            with lock:
                deleted.add(label)

    def querier(seed: int) -> None:
        q = points(20, seed)
        while not stop.is_set():
            with lock:
                gone = set(deleted)
            try:
                labels, _ = ix.knn_query(q, k=K, num_threads=1)
            except RuntimeError:  # a row found fewer than k live neighbours ("Cannot return the results")
                with lock:
                    state["short"] += 1
                continue
            bad = len(set(labels.ravel().tolist()) & gone)
            with lock:
                state["queries"] += len(q)
                state["violations"] += bad

    threads = [threading.Thread(target=adder), threading.Thread(target=deleter)]
    threads += [threading.Thread(target=querier, args=(s,)) for s in (2, 3)]
    for t in threads:
        t.start()
    time.sleep(seconds)  # the run's length, not synchronisation: every thread checks `stop`
    stop.set()
    for t in threads:
        t.join()
    survivors = np.array(sorted(set(range(state["added"])) - deleted))
    fresh = mod.Index("l2", DIM)
    fresh.init_index(len(survivors), M=M, ef_construction=EFC)
    fresh.set_ef(EF)
    fresh.add_items(x[survivors], survivors)
    q = points(1000, 4)
    churned, rebuilt = recall(ix, x, survivors, q), recall(fresh, x, survivors, q)
    return {
        "added": state["added"],
        "deleted": len(deleted),
        "queries": state["queries"],
        "violations": state["violations"],
        "short_results": state["short"],
        "recall_churned": churned,
        "recall_fresh": rebuilt,
        "recall_diff": churned - rebuilt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--n", type=int, default=40_000, help="vectors available to the adder")
    ap.add_argument("--batch", type=int, default=200)
    args = ap.parse_args()
    x = points(args.n, 0)
    rows = []
    libs: list[tuple[str, Any]] = [("phi3fast", hnsw)]
    try:
        import hnswlib

        libs.append(("hnswlib", hnswlib))
    except ImportError:
        print("hnswlib not installed: phi3fast only")
    for name, mod in libs:
        print(f"== {name}: {args.seconds:g} s of churn")
        rows.append({"lib": name, **churn(mod, x, args.seconds, args.batch)})
    print_table(
        rows,
        [
            "lib",
            "added",
            "deleted",
            "queries",
            "violations",
            "short_results",
            "recall_churned",
            "recall_fresh",
            "recall_diff",
        ],
    )
    print(f"wrote {write_rows('churn', rows)}")


if __name__ == "__main__":
    main()
