"""Retrieval quality on a corpus the retrieval was not tuned on: phi3fast's hybrid search against the naive
baseline of issue #16, on the same documents and questions, in one run.

    python bench/retrieval.py [--data plant|water] [--split train|heldout|both|all] [--chunk-tokens N --overlap N]
                              [--reranker X]

Data (--data, a folder under bench/data with corpus/ and questions.{train,heldout}.jsonl; see each README):
`plant` (40 documents of a fictional beverage plant, the default) or `water` (38 documents of a fictional water
utility, written after the settings were first chosen on `plant`). Settings are chosen on train halves only
(`--split all` of `plant` is tuning data too, its held-out half having been seen); the held-out half of `water`
is reported once, never tuned on.

- phi3fast: built and queried as a new user does: `Index.build([corpus], out)` with the defaults (what
  `phi3fast index CORPUS --out OUT` runs), then `index.search(question, k=5)` (what `phi3fast query` prints).
  Options given on the command line (for tuning) are passed to Index.build.
- naive: the baseline the issue names: the same document text (phi3fast's readers, so both see the same
  words) cut into plain 150-word chunks, all-MiniLM-L6-v2 vectors (exact cosine) and Okapi BM25 (k1 1.5,
  b 0.75, lowercase word tokens), each list's top 50 fused by reciprocal rank (k = 60), top 5 kept.

Metrics, per question, over the 5 results in rank order: document recall@1 (the first result comes from the
question's source), recall@5 (some result does) and MRR (1 / rank of the first result from the source; 0 if
none). The ratio row is phi3fast / naive.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_rows  # noqa: E402

from phi3fast.rag import Index  # noqa: E402
from phi3fast.rag.embedders import shared_embedder  # noqa: E402
from phi3fast.rag.readers import iter_files, read_documents  # noqa: E402

DATA_ROOT = Path(__file__).resolve().parent / "data"
K = 5
NAIVE_WORDS = 150
NAIVE_DEPTH = 50
RRF_K = 60
_TOKEN = re.compile(r"\w+")


def data_dir(name: str) -> Path:
    """A labelled corpus: a name under bench/data (plant, water) or a folder."""
    path = DATA_ROOT / name if (DATA_ROOT / name).is_dir() else Path(name)
    if not (path / "corpus").is_dir():
        raise SystemExit(
            f"error: {path}: no corpus/ folder (a labelled corpus has corpus/ and questions.*.jsonl)"
        )
    return path


def load_questions(data: Path, split: str) -> list[dict]:
    """The questions of one split (train, heldout) or of both (all)."""
    if split == "all":
        return load_questions(data, "train") + load_questions(data, "heldout")
    path = data / f"questions.{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score(ranked_sources: list[list[str]], questions: list[dict]) -> dict:
    r1 = r5 = rr = 0.0
    missed = []
    for sources, q in zip(ranked_sources, questions, strict=True):
        rank = next((i for i, s in enumerate(sources[:K], 1) if s == q["source"]), None)
        r1 += rank == 1
        r5 += rank is not None
        rr += 1.0 / rank if rank else 0.0
        if rank != 1:
            missed.append(
                {"question": q["question"], "source": q["source"], "got": sources[:3], "rank": rank}
            )
    n = len(questions)
    return {"n": n, "recall@1": r1 / n, "recall@5": r5 / n, "MRR": rr / n, "missed": missed}


class NaiveBaseline:
    """MiniLM + BM25 over plain 150-word chunks, fused by reciprocal rank."""

    def __init__(self, corpus: Path) -> None:
        self.emb = shared_embedder()
        self.chunks: list[tuple[str, str]] = []  # (source, text)
        for path, source in iter_files([corpus]):
            for doc in read_documents(path, source):
                words = doc.text.split()
                for i in range(0, len(words), NAIVE_WORDS):
                    self.chunks.append((doc.source, " ".join(words[i : i + NAIVE_WORDS])))
        self.vectors = self.emb.encode([t for _, t in self.chunks])
        self.docs = [[w.lower() for w in _TOKEN.findall(t)] for _, t in self.chunks]
        self.tf = [Counter(d) for d in self.docs]
        df = Counter(w for d in self.docs for w in set(d))
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}
        self.avgdl = sum(map(len, self.docs)) / n

    def bm25(self, question: str) -> np.ndarray:
        k1, b = 1.5, 0.75
        terms = [w.lower() for w in _TOKEN.findall(question)]
        out = np.zeros(len(self.docs))
        for j, (tf, d) in enumerate(zip(self.tf, self.docs, strict=True)):
            norm = k1 * (1 - b + b * len(d) / self.avgdl)
            out[j] = sum(self.idf[t] * tf[t] * (k1 + 1) / (tf[t] + norm) for t in terms if t in tf)
        return out

    def search(self, question: str) -> list[str]:
        dense = np.argsort(-(self.vectors @ self.emb.encode([question])[0]), kind="stable")[:NAIVE_DEPTH]
        bm = self.bm25(question)
        keyword = [j for j in np.argsort(-bm, kind="stable")[:NAIVE_DEPTH] if bm[j] > 0]
        fused: dict[int, float] = {}
        for lst in (dense, keyword):
            for r, j in enumerate(lst, 1):
                fused[int(j)] = fused.get(int(j), 0.0) + 1.0 / (RRF_K + r)
        best = sorted(fused, key=lambda j: -fused[j])[:K]
        return [self.chunks[j][0] for j in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="plant", help="plant, water, or a folder (default: plant)")
    ap.add_argument("--split", choices=["train", "heldout", "both", "all"], default="both")
    ap.add_argument(
        "--chunk-tokens", type=int, default=None, help="passed to Index.build (tuning; train only)"
    )
    ap.add_argument("--overlap", type=int, default=None)
    ap.add_argument("--reranker", default=None, help="a CrossEncoder for Index.build (default: none)")
    ap.add_argument("--name", default="retrieval", help="bench/results/NAME.json")
    ap.add_argument("--show-missed", action="store_true")
    args = ap.parse_args()
    splits = ["train", "heldout"] if args.split == "both" else [args.split]
    data = data_dir(args.data)
    corpus = data / "corpus"

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index = Index.build(
            [corpus],
            Path(tmp) / f"{data.name}.idx",
            chunk_tokens=args.chunk_tokens,
            overlap=args.overlap,
            reranker=args.reranker,
            progress=False,
        )
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive = NaiveBaseline(corpus)
        naive_s = time.perf_counter() - t0
        settings = {
            "chunk_tokens": index.manifest["chunk_tokens"],
            "overlap": index.manifest["overlap"],
            "reranker": (index.manifest["reranker"] or {}).get("name"),
            "chunks": len(index),
            "naive_chunks": len(naive.chunks),
        }
        rows = []
        for split in splits:
            questions = load_questions(data, split)
            ours = score([[r.source for r in index.search(q["question"], k=K)] for q in questions], questions)
            base = score([naive.search(q["question"]) for q in questions], questions)
            for system, s in (("phi3fast hybrid", ours), ("naive MiniLM+BM25 RRF", base)):
                rows.append({"data": data.name, "split": split, "system": system, **settings, **s})
            ratio = {
                m: ours[m] / base[m] if base[m] else float("nan") for m in ("recall@1", "recall@5", "MRR")
            }
            rows.append(
                {
                    "data": data.name,
                    "split": split,
                    "system": "ratio phi3fast/naive",
                    **ratio,
                    "n": len(questions),
                }
            )
    print(
        f"build: phi3fast {build_s:.1f} s ({settings['chunks']} chunks), naive {naive_s:.1f} s "
        f"({settings['naive_chunks']} chunks); settings {settings}"
    )
    print_table(rows, ["data", "split", "system", "n", "recall@1", "recall@5", "MRR"])
    if args.show_missed:
        for r in rows:
            for m in r.get("missed", []):
                print(
                    f"[{r['split']}/{r['system']}] rank {m['rank']}: {m['question']} ({m['source']}) got {m['got']}"
                )
    print(f"wrote {write_rows(args.name, rows)}")


if __name__ == "__main__":
    main()
