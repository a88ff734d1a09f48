"""The optional cross-encoder reranker (`--reranker`), with a tiny CrossEncoder built and saved here (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from phi3fast.cli import main
from phi3fast.errors import Phi3FastError
from phi3fast.rag import Index
from phi3fast.rag.embedders import Embedder, bundled_model_path, shared_embedder
from phi3fast.rag.index import RERANK_DEPTH
from phi3fast.rag.rerank import Reranker

QUESTIONS = ["impeller nut torque", "What does fault F07 mean?", "grease interval of the pump"]


@pytest.fixture(scope="module")
def emb() -> Embedder:
    return shared_embedder()


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer BERT with one output label and MiniLM's tokenizer: a valid CrossEncoder folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    d = tmp_path_factory.mktemp("tiny-cross-encoder")
    tok = AutoTokenizer.from_pretrained(bundled_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=512,
        num_labels=1,
    )
    BertForSequenceClassification(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    for model, torque, code in (
        ("CP-200", 45, "earth fault"),
        ("CP-250", 60, "phase loss"),
        ("CP-300", 75, "overheat"),
    ):
        (d / f"{model.lower()}.md").write_text(
            f"# Pump {model}\n\n## Impeller\n\nTighten the impeller nut of the {model} to {torque} N·m.\n\n"
            f"## Lubrication\n\nGrease the {model} bearings every {torque * 40} hours.\n\n"
            f"## Faults\n\nOn the {model} drive, fault F07 means {code}.\n"
        )
    return d


def _key(results: list) -> list[tuple[str, int, float]]:
    return [(r.source, r.start, round(r.score, 4)) for r in results]


def test_reranker_orders_the_fused_candidates_by_its_scores(
    docs: Path, cross_encoder: Path, emb: Embedder, tmp_path: Path
) -> None:
    index = Index.build([docs], tmp_path / "idx", embedder=emb, reranker=str(cross_encoder), progress=False)
    assert index.manifest["reranker"] == {"name": str(cross_encoder)}
    plain = Index.open(tmp_path / "idx", reranker="none")
    ce = Reranker(str(cross_encoder))
    reordered = 0
    for q in QUESTIONS:
        fused = plain.search(q, k=RERANK_DEPTH)
        scores = ce.scores(q, [f"{r.heading}\n{r.text}" if r.heading else r.text for r in fused])
        order = sorted(range(len(fused)), key=lambda i: -scores[i])
        expect = [(fused[i].source, fused[i].start, round(float(scores[i]), 4)) for i in order][:3]
        got = index.search(q, k=3)
        assert _key(got) == expect and [r.rank for r in got] == [1, 2, 3]
        reordered += [r.start for r in got] != [r.start for r in fused[:3]]
        # Only hybrid search is reranked: dense and keyword keep their own scores.
        assert _key(index.search(q, k=3, mode="keyword")) == _key(plain.search(q, k=3, mode="keyword"))
    assert reordered > 0  # a random cross-encoder disagrees with the fusion somewhere


def test_reranker_kept_dropped_and_overridden(
    docs: Path, cross_encoder: Path, emb: Embedder, tmp_path: Path
) -> None:
    idx = tmp_path / "idx"
    Index.build([docs], idx, embedder=emb, reranker=str(cross_encoder), progress=False)
    again = Index.build([docs], idx, embedder=emb, progress=False)  # a re-run keeps the index's reranker
    assert (
        again.manifest["reranker"] == {"name": str(cross_encoder)} and again.build_stats.chunks_embedded == 0
    )
    dropped = Index.build([docs], idx, embedder=emb, reranker="none", progress=False)
    assert dropped.manifest["reranker"] is None and dropped.manifest["generation"] == "gen-000001"
    assert dropped.reranker is None
    assert Index.open(idx, reranker=str(cross_encoder)).reranker.name == str(cross_encoder)


def test_bad_reranker_is_a_clear_error_before_indexing(docs: Path, tmp_path: Path) -> None:
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(Phi3FastError, match="cannot load reranker"):
        Index.build([docs], tmp_path / "idx", reranker=str(not_a_model), progress=False)
    assert not (tmp_path / "idx").exists()
    r = CliRunner().invoke(
        main, ["index", str(docs), "--out", str(tmp_path / "idx"), "--reranker", str(not_a_model)]
    )
    assert (
        r.exit_code == 2 and r.stderr.startswith("error: cannot load reranker") and r.stderr.count("\n") == 1
    )


def test_cli_index_and_query_with_reranker(docs: Path, cross_encoder: Path, tmp_path: Path) -> None:
    import json

    idx = str(tmp_path / "idx")
    r = CliRunner().invoke(main, ["index", str(docs), "--out", idx, "--reranker", str(cross_encoder)])
    assert r.exit_code == 0, r.output
    reranked = CliRunner().invoke(main, ["query", QUESTIONS[0], "--index", idx, "--json", "-k", "3"])
    plain = CliRunner().invoke(
        main, ["query", QUESTIONS[0], "--index", idx, "--json", "-k", "3", "--reranker", "none"]
    )
    assert reranked.exit_code == 0 and plain.exit_code == 0, reranked.output + plain.output
    got = [(h["source"], h["start"]) for h in json.loads(reranked.output)["results"]]
    expect = [(h.source, h.start) for h in Index.open(idx).search(QUESTIONS[0], k=3)]
    assert got == expect
    # --reranker none: the fused scores of hybrid search, not the cross-encoder's.
    fused = [h.score for h in Index.open(idx, reranker="none").search(QUESTIONS[0], k=3)]
    assert [h["score"] for h in json.loads(plain.output)["results"]] == pytest.approx(fused)
    assert [h["score"] for h in json.loads(reranked.output)["results"]] != pytest.approx(fused)
