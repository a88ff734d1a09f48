"""SIMD distance throughput: each SIMD level of phi3fast._hnsw against numpy on the same all-pairs work.

    python bench/distances.py [--dim 384] [--n 64] [--m 4096]

Prints GB/s of vector data streamed and the ratio to numpy (float32 broadcasting for L2, matmul for IP).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, timeit, write_rows  # noqa: E402

from phi3fast import _hnsw  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--n", type=int, default=64, help="queries")
    ap.add_argument("--m", type=int, default=4096, help="database vectors")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    x = rng.standard_normal((args.m, args.dim)).astype(np.float32)
    gbytes = args.n * args.m * args.dim * 4 / 1e9  # one database vector read per pair

    peers = {
        "l2": lambda: ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1),
        "ip": lambda: q @ x.T,
    }
    rows = []
    for metric, peer in peers.items():
        t_peer = timeit(peer)
        rows.append(
            {"metric": metric, "impl": "numpy", "ms": t_peer * 1e3, "GB/s": gbytes / t_peer, "x_numpy": 1.0}
        )
        for level in _hnsw.supported_simd_levels():
            t = timeit(lambda level=level, metric=metric: _hnsw.pairwise(q, x, metric, level))
            rows.append(
                {
                    "metric": metric,
                    "impl": f"phi3fast/{level}",
                    "ms": t * 1e3,
                    "GB/s": gbytes / t,
                    "x_numpy": t_peer / t,
                }
            )
    print(f"all-pairs distances: {args.n} x {args.m} vectors, dim {args.dim}, one thread")
    print_table(rows, ["metric", "impl", "ms", "GB/s", "x_numpy"])
    print(f"wrote {write_rows('distances', rows)}")


if __name__ == "__main__":
    main()
