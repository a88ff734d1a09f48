"""Hybrid search fuses normalised scores (phi3fast/rag/fusion.py), whatever the depth the lists were fetched at."""

from __future__ import annotations

import pytest
from rag_helpers import index_of

from phi3fast.rag import Index
from phi3fast.rag.fusion import NORM_DEPTH, WEIGHTS, normalise, rrf_fuse, score_fuse


def test_normalise_runs_from_the_best_hit_to_the_hit_at_the_norm_depth() -> None:
    assert normalise([]) == {}
    assert normalise([(7, 3.0)]) == {7: 1.0}
    assert normalise([(1, 2.0), (2, 2.0)]) == {1: 1.0, 2: 1.0}  # all alike: no scale to map
    assert normalise([(1, 10.0), (2, 7.5), (3, 5.0), (4, 0.0)], depth=3) == {1: 1.0, 2: 0.5, 3: 0.0, 4: 0.0}
    # Shorter than the depth: the last hit is the floor.
    assert normalise([(1, 0.9), (2, 0.6), (3, 0.3)]) == pytest.approx({1: 1.0, 2: 0.5, 3: 0.0})


def test_score_fuse_keeps_the_gaps_that_rank_fusion_drops() -> None:
    # The dense list is a near-tie; the keyword list puts chunk 2 far ahead (every rare word of the question).
    dense = [(1, 0.80), (2, 0.79), (3, 0.20)]
    keyword = [(2, 30.0), (1, 2.0), (3, 1.0)]
    fused = score_fuse(dense, keyword, [])
    assert [c for c, _ in fused] == [2, 1, 3]
    d2, k2 = (0.79 - 0.20) / 0.60, 1.0
    d1, k1 = 1.0, (2.0 - 1.0) / 29.0
    assert fused[0][1] == pytest.approx(WEIGHTS[0] * d2 + WEIGHTS[1] * k2)
    assert fused[1][1] == pytest.approx(WEIGHTS[0] * d1 + WEIGHTS[1] * k1)
    assert fused[2][1] == 0.0
    # Rank fusion sees ranks 1+2 against 2+1: a tie, broken by first appearance, so chunk 1 would win.
    assert [c for c, _ in rrf_fuse(dense, keyword)][:2] == [1, 2]
    # The identifier list breaks a tie between two chunks equally good in dense and keyword.
    tie_d, tie_k = [(5, 0.9), (6, 0.9), (9, 0.1)], [(6, 4.0), (5, 4.0), (9, 1.0)]
    assert [c for c, _ in score_fuse(tie_d, tie_k, [(6, 3.0)])][0] == 6
    assert score_fuse() == []
    with pytest.raises(ValueError, match="weights"):
        score_fuse(dense, keyword, [], weights=(1.0, 1.0))


def test_score_fuse_top_is_independent_of_fetch_depth() -> None:
    # Lists fetched to NORM_DEPTH and to three times that fuse their first NORM_DEPTH hits the same way.
    n = 3 * NORM_DEPTH
    dense = [(i, 1.0 - i / n) for i in range(n)]
    keyword = [((i * 37) % n, float(n - i) ** 1.5) for i in range(n)]
    shallow = score_fuse(dense[:NORM_DEPTH], keyword[:NORM_DEPTH], [])
    deep = score_fuse(dense, keyword, [])
    top = [c for c, s in shallow if s > 0]
    assert len(top) > 10
    assert [c for c, _ in deep[: len(top)]] == top
    assert [s for _, s in deep[: len(top)]] == pytest.approx([s for _, s in shallow[: len(top)]])


DOCS = {
    "drum.md": "# Chlorine drums\n\nDrums are changed by two operators. Each joint is tested with ammonia vapour.\n",
    "tank.md": "# Storage tanks\n\nTank walls are sprayed with chlorine solution after cleaning, then refilled.\n",
    "meter.md": "# Meters\n\nThe RM-80W meter is a Woltmann meter. Meters need straight pipe upstream.\n",
    "pump.md": "# Pumps\n\nThe pump station holds the pressure. The meter on the outlet reads the flow.\n",
}


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    return index_of(DOCS, tmp_path_factory)


@pytest.mark.parametrize("question", ["How is a chlorine drum joint checked for leaks?", "RM-80W meter flow"])
def test_hybrid_search_is_the_score_fusion_of_the_three_lists(index: Index, question: str) -> None:
    view = index.store.view()
    depth = len(index)
    expected = score_fuse(
        view.dense(index.embedder.encode([question])[0], depth),
        view.keyword(question, depth),
        view.identifier(question, depth),
    )
    rows = view.rows([c for c, _ in expected])
    got = index.search(question, k=3)
    assert [(r.source, r.text) for r in got] == [(rows[c].source, rows[c].text) for c, _ in expected[:3]]
    assert [r.score for r in got] == pytest.approx([s for _, s in expected[:3]])
    assert 0.0 <= got[-1].score <= got[0].score <= sum(WEIGHTS)


def test_hybrid_ranks_the_obvious_documents_first(index: Index) -> None:
    assert index.search("How is a chlorine drum joint checked for leaks?", k=1)[0].source == "drum.md"
    assert index.search("RM-80W meter flow", k=1)[0].source == "meter.md"
    assert index.search("what is sprayed on tank walls after cleaning", k=1)[0].source == "tank.md"
