"""Search-side levers of hybrid retrieval, swept on TUNING questions only (never a held-out half), over one
built index per labelled corpus.

    python bench/retrieval_sweep.py [--set plant:all --set water:train] [--chunk-tokens N --overlap N]
                                    [--no-forms] [--grid]

Each --set is DATA:SPLIT (bench/retrieval.py's --data and --split); the default is the tuning data of issue #16
item 4: all of `plant` (its held-out half has been seen) and the train half of `water`. A set naming a held-out
half is refused: those questions are for the one final run of bench/retrieval.py.

For each set it builds the corpus with phi3fast's defaults (or the chunking given), keeps each question's
dense, keyword and identifier lists (depth 200), then re-fuses them offline. It prints document recall@1 /
recall@5 / MRR per set and pooled, for: each list alone, reciprocal rank fusion (the old default), score fusion
(phi3fast.rag.fusion, the default), de-duplication by document, and with --grid: RRF k 10/30/60 x keyword
weight 0.5/1/1.5/2/3 x identifier weight 1/2/3 x candidate depth 20/40/100, then score fusion with dense
weight 0.2-0.8 (keyword 1 - that) x identifier weight 0/0.1/0.3 x normalisation depth 20/40/100.
--no-forms matches codes only as written (keywords.py, "Note: one code, several spellings", switched off).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval import K, data_dir, load_questions, score  # noqa: E402

import phi3fast.rag.stores.keywords as keywords  # noqa: E402
from phi3fast.rag import Index  # noqa: E402
from phi3fast.rag.fusion import NORM_DEPTH, WEIGHTS, normalise  # noqa: E402

DEPTH = 200
DEFAULT_SETS = ["plant:all", "water:train"]


def fuse(lists: list[list[tuple[int, float]]], weights: tuple[float, ...], k: int) -> list[int]:
    fused: dict[int, float] = {}
    for lst, w in zip(lists, weights, strict=True):
        for r, (cid, _) in enumerate(lst, 1):
            fused[cid] = fused.get(cid, 0.0) + w / (k + r)
    return sorted(fused, key=lambda c: -fused[c])


def combine(lists: list[list[tuple[int, float]]], weights: tuple[float, ...], depth: int) -> list[int]:
    """Score fusion as hybrid search does it (phi3fast.rag.fusion), each list's scale set by its hit at `depth`."""
    fused: dict[int, float] = {}
    for lst, w in zip(lists, weights, strict=True):
        for c, v in normalise(lst, depth).items():
            fused[c] = fused.get(c, 0.0) + w * v
    return sorted(fused, key=lambda c: -fused[c])


class TuningSet:
    """One corpus's tuning questions with their three ranked lists, and the source of every chunk in them."""

    def __init__(self, spec: str, tmp: Path, chunk_tokens: int | None, overlap: int | None) -> None:
        name, _, split = spec.partition(":")
        split = split or "train"
        if split in ("heldout", "both"):
            raise SystemExit(f"error: --set {spec}: held-out questions are never swept (tuning data only)")
        data = data_dir(name)
        self.name = f"{data.name}:{split}"
        self.questions = load_questions(data, split)
        index = Index.build(
            [data / "corpus"], tmp / data.name, chunk_tokens=chunk_tokens, overlap=overlap, progress=False
        )
        view = index.store.view()
        vecs = index.embedder.encode([q["question"] for q in self.questions])
        self.lists = [
            (
                view.dense(vec, DEPTH),
                view.keyword(q["question"], DEPTH),
                view.identifier(q["question"], DEPTH),
            )
            for q, vec in zip(self.questions, vecs, strict=True)
        ]
        ids = sorted({c for three in self.lists for lst in three for c, _ in lst})
        self.source = {c: r.source for c, r in view.rows(ids).items()}
        self.chunks = len(index)

    def run(self, rrf_k: int, weights: tuple[float, ...], depth: int, dedupe: bool = False) -> dict:
        """Fused by RRF with constant rrf_k, or (rrf_k 0) by score fusion normalised at rank `depth`."""
        ranked = []
        for three in self.lists:
            cut = [lst[:depth] for lst in three]
            order = fuse(cut, weights, rrf_k) if rrf_k else combine(cut, weights, depth)
            docs = [self.source[c] for c in order]
            ranked.append((list(dict.fromkeys(docs)) if dedupe else docs)[:K])
        return score(ranked, self.questions)


def line(sets: list[TuningSet], results: list[dict]) -> str:
    n = sum(r["n"] for r in results)
    pooled = {m: sum(r[m] * r["n"] for r in results) / n for m in ("recall@1", "recall@5", "MRR")}
    parts = [
        f"{s.name} {r['recall@1']:.3f} {r['recall@5']:.3f} {r['MRR']:.3f}"
        for s, r in zip(sets, results, strict=True)
    ]
    return " | ".join(
        parts + [f"pooled {pooled['recall@1']:.3f} {pooled['recall@5']:.3f} {pooled['MRR']:.3f}"]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--set", action="append", dest="sets", help="DATA:SPLIT (repeatable); default plant:all, water:train"
    )
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--overlap", type=int, default=None)
    ap.add_argument("--no-forms", action="store_true")
    ap.add_argument("--grid", action="store_true", help="also sweep RRF k, list weights and depth")
    ap.add_argument("--show-missed", action="store_true", help="the default fusion's misses")
    args = ap.parse_args()
    if args.no_forms:
        keywords.identifier_forms = lambda word: [word]
    with tempfile.TemporaryDirectory() as tmp:
        sets = [TuningSet(s, Path(tmp), args.chunk_tokens, args.overlap) for s in args.sets or DEFAULT_SETS]
    print(", ".join(f"{s.name}: {s.chunks} chunks, {len(s.questions)} questions" for s in sets))

    def show(label: str, *run_args, **run_kw) -> list[dict]:
        results = [s.run(*run_args, **run_kw) for s in sets]
        print(f"{label}: {line(sets, results)}")
        return results

    show("dense alone", 60, (1, 0, 0), DEPTH)
    show("keyword alone", 60, (0, 1, 0), DEPTH)
    show("reciprocal rank fusion, the old default (k 60, weights 1/1/1, depth 40)", 60, (1, 1, 1), 40)
    w = "/".join(f"{x:g}" for x in WEIGHTS)
    default = show(f"score fusion, the default (weights {w}, depth {NORM_DEPTH})", 0, WEIGHTS, NORM_DEPTH)
    show("... de-duplicated by document", 0, WEIGHTS, NORM_DEPTH, dedupe=True)
    if args.show_missed:
        for s, r in zip(sets, default, strict=True):
            for m in r["missed"]:
                print(f"  [{s.name}] rank {m['rank']}: {m['question']} ({m['source']}) got {m['got']}")
    if args.grid:
        grid = itertools.product([10, 30, 60], [0.5, 1, 1.5, 2, 3], [1, 2, 3], [20, 40, 100])
        for rrf_k, w_kw, w_id, depth in grid:
            show(f"k {rrf_k} keyword {w_kw} identifier {w_id} depth {depth}", rrf_k, (1, w_kw, w_id), depth)
        for alpha, w_id, depth in itertools.product(
            [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [0, 0.1, 0.3], [40, 100]
        ):
            weights = (alpha, 1 - alpha, w_id)
            show(
                f"score combination dense {alpha} keyword {1 - alpha:.1f} identifier {w_id} depth {depth}",
                0,
                weights,
                depth,
            )


if __name__ == "__main__":
    main()
