"""Search-side levers of hybrid retrieval, swept on the TRAIN half only (never held-out), over one built index.

    python bench/retrieval_sweep.py [--chunk-tokens N --overlap N] [--no-forms]

Builds the plant corpus with phi3fast's defaults (or the chunking given), keeps each train question's dense,
keyword and identifier lists (depth 200), then re-fuses them offline: RRF k 10/30/60 x keyword weight
0.5/1/1.5 x identifier weight 1/2 x candidate depth 20/40/100, plus de-duplication by document before the top 5.
--no-forms matches codes only as written (keywords.py, "Note: one code, several spellings", switched off).
Prints document recall@1 / recall@5 / MRR per setting (docs/indexing.md, "Retrieval quality: what was tried").
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval import DATA, K, load_questions, score  # noqa: E402

import phi3fast.rag.stores.keywords as keywords  # noqa: E402
from phi3fast.rag import Index  # noqa: E402

DEPTH = 200


def fuse(lists: list[list[tuple[int, float]]], weights: tuple[float, ...], k: int) -> list[int]:
    fused: dict[int, float] = {}
    for lst, w in zip(lists, weights, strict=True):
        for r, (cid, _) in enumerate(lst, 1):
            fused[cid] = fused.get(cid, 0.0) + w / (k + r)
    return sorted(fused, key=lambda c: -fused[c])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--overlap", type=int, default=None)
    ap.add_argument("--no-forms", action="store_true")
    args = ap.parse_args()
    if args.no_forms:
        keywords.identifier_forms = lambda word: [word]
    questions = load_questions("train")
    with tempfile.TemporaryDirectory() as tmp:
        index = Index.build(
            [DATA / "corpus"],
            Path(tmp) / "i",
            chunk_tokens=args.chunk_tokens,
            overlap=args.overlap,
            progress=False,
        )
        view = index.store.view()
        lists = []
        for q in questions:
            vec = index.embedder.encode([q["question"]])[0]
            text = q["question"]
            lists.append((view.dense(vec, DEPTH), view.keyword(text, DEPTH), view.identifier(text, DEPTH)))
        ids = sorted({c for three in lists for lst in three for c, _ in lst})
        source = {c: r.source for c, r in view.rows(ids).items()}
        print(f"{len(index)} chunks, {len(questions)} train questions")

        def run(rrf_k: int, weights: tuple[float, ...], depth: int, dedupe: bool = False) -> str:
            ranked = []
            for three in lists:
                docs = [source[c] for c in fuse([lst[:depth] for lst in three], weights, rrf_k)]
                ranked.append((list(dict.fromkeys(docs)) if dedupe else docs)[:K])
            s = score(ranked, questions)
            return f"{s['recall@1']:.3f} {s['recall@5']:.3f} {s['MRR']:.3f}"

        print("default (k 60, weights 1/1/1, depth 40):", run(60, (1, 1, 1), 40))
        print("de-duplicated by document:", run(60, (1, 1, 1), 40, dedupe=True))
        for rrf_k, w_kw, w_id, depth in itertools.product([10, 30, 60], [0.5, 1, 1.5], [1, 2], [20, 40, 100]):
            print(
                f"k {rrf_k} keyword {w_kw} identifier {w_id} depth {depth}:",
                run(rrf_k, (1, w_kw, w_id), depth),
            )


if __name__ == "__main__":
    main()
