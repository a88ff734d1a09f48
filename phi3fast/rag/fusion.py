"""Fusing the ranked lists of hybrid search (dense, keyword, identifier) into one ranking.

Hybrid search fuses by score (score_fuse): each list's scores are mapped onto [0, 1], from its best hit (1) to
the hit at rank NORM_DEPTH (0; a shorter list: its last hit), and the fused score of a chunk is the weighted sum
of its normalised scores (0 in a list that does not hold it). The three lists weigh the same, 0.5 each: no
weight was fitted. The identifier list exists only for questions with codes (index.py, "Exact identifiers"),
and there it must be able to lift the chunk that holds the code the user typed over chunks that merely share
its letters and the question's common words (with Milvus's BM25, which matches "XR-7740" for "XR-7755" on
"xr", only the identifier list tells them apart).

Why scores and not ranks
------------------------
Reciprocal rank fusion (rrf_fuse, kept for callers who fuse lists from elsewhere) throws away how far apart the
hits of a list are: a keyword list whose first chunk holds every rare word of the question and whose second
holds one common word gives them 1/61 and 1/62. A normalised score keeps that gap, and keeps the dense list's
near-ties as near-ties. On the tuning questions of docs/indexing.md ("Retrieval quality: what was tried") RRF
ranked the right document first for 0.907 of them, this fusion for 0.938 (192/24 chunks, the same lists). A
weighted sum of normalised scores also beat RRF in the comparison of Bruch, Gai and Ingber (2023, "An analysis
of fusion functions for hybrid retrieval"), in and out of the domain its weight was set on.

Normalising to the hit at a fixed rank (not to the last hit fetched) makes the fused order of the top hits
independent of how deep the lists were fetched: a search for k = 50, or one that feeds a reranker, ranks its
first results as a search for k = 5 does. Scores only need to be higher-is-better within a list, so cosine
similarities, FTS5 BM25 and Milvus BM25 (another scale) all fuse alike.
"""

from __future__ import annotations

RRF_K = (
    60  # reciprocal rank fusion constant from Cormack et al. (2009); damps the weight of the top few ranks
)
NORM_DEPTH = 40  # a list's score scale runs from its best hit to its hit at this rank
WEIGHTS = (0.5, 0.5, 0.5)  # dense, keyword, identifier

Ranked = list[tuple[int, float]]  # (chunk id, score, higher is better), best first


def normalise(ranked: Ranked, depth: int = NORM_DEPTH) -> dict[int, float]:
    """Each id's score on [0, 1]: 1 for the best hit, 0 for the hit at rank `depth` (or the last, if fewer)
    and anything below it. A list whose hits all score alike gives each 1."""
    if not ranked:
        return {}
    hi = ranked[0][1]
    lo = ranked[min(len(ranked), depth) - 1][1]
    span = hi - lo
    if span <= 0:
        return {cid: 1.0 for cid, _ in ranked}
    return {cid: max(0.0, (s - lo) / span) for cid, s in ranked}


def score_fuse(*ranked_lists: Ranked, weights: tuple[float, ...] = WEIGHTS) -> Ranked:
    """Weighted sum of each list's normalised scores; best first. Ties keep the order of first appearance
    (dense first), which makes results deterministic."""
    if len(weights) < len(ranked_lists):
        raise ValueError(f"{len(ranked_lists)} lists but {len(weights)} weights")
    fused: dict[int, float] = {}
    for lst, w in zip(ranked_lists, weights, strict=False):
        for cid, s in normalise(lst).items():
            fused[cid] = fused.get(cid, 0.0) + w * s
    return sorted(fused.items(), key=lambda t: -t[1])


def rrf_fuse(*ranked_lists: Ranked) -> Ranked:
    """Reciprocal rank fusion: each id scores sum(1 / (RRF_K + rank)) over the lists holding it; best first.

    Ranks, not scores, are fused, so cosine similarities and BM25 values need no common scale. Ties keep the
    order of first appearance (dense first), which makes results deterministic.
    """
    fused: dict[int, float] = {}
    for lst in ranked_lists:
        for r, (cid, _) in enumerate(lst, 1):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + r)
    return sorted(fused.items(), key=lambda t: -t[1])
