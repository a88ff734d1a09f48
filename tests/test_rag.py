"""RAG end to end on a small fictional corpus (tests/data/rag): recall, jargon, odd files, incremental updates,
atomic builds, the writer lock, corrupt indexes, threads, and the CLI's JSON.

The embedder (all-MiniLM-L6-v2, a few seconds to load) and the corpus index are built once per module.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from rag_helpers import CHUNK_TOKENS, DATA, OVERLAP, QUESTIONS, edit_small_corpus, hit, small_corpus
from test_rag_readers import make_pdf

from phi3fast.cli import main
from phi3fast.errors import ArgumentError, Phi3FastError
from phi3fast.rag import Index
from phi3fast.rag.embedders import Embedder, shared_embedder
from phi3fast.rag.readers import read_documents

LATIN1 = "Compresseur K7 — notice d'entretien\n\nTempérature maximale de l'huile: 60 °C. Joint de culasse, pièce KZ-5518.\n"
UTF16 = "Service notes\n\nFault H-204 on the K7 compressor means the oil level switch is open.\n"


@pytest.fixture(scope="module")
def emb() -> Embedder:
    return shared_embedder()  # the CLI verbs invoked in-process below reuse it


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The labelled corpus plus odd files: Latin-1, UTF-16, a PDF, and files that must be skipped."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(DATA / "corpus", root, dirs_exist_ok=True)
    (root / "manuals" / "compressor-k7.txt").write_bytes(LATIN1.replace("—", "-").encode("latin-1"))
    (root / "support" / "notes.txt").write_bytes(UTF16.encode("utf-16"))  # with a BOM
    (root / "manuals" / "k7-datasheet.pdf").write_bytes(
        make_pdf(["K7 compressor datasheet", "Part KZ-6001 filter"])
    )
    (root / "empty.md").write_bytes(b"")
    (root / "blob.txt").write_bytes(b"\x00\x01\x02\xff" * 64)
    (root / "scan.pdf").write_bytes(b"%PDF-1.4 not really")
    return root


@pytest.fixture(scope="module")
def built(corpus: Path, emb: Embedder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Index, list[str]]:
    warnings: list[str] = []
    out = tmp_path_factory.mktemp("idx") / "index"
    index = Index.build(
        [corpus],
        out,
        embedder=emb,
        chunk_tokens=CHUNK_TOKENS,
        overlap=OVERLAP,
        progress=False,
        warn=warnings.append,
    )
    return index, warnings


@pytest.fixture(scope="module")
def hybrid_top5(built: tuple[Index, list[str]]) -> list[list]:
    """Hybrid top-5 for every labelled question (computed once; several tests read it)."""
    index, _ = built
    return [index.search(q["question"], k=5) for q in QUESTIONS]


def test_recall_at_5_hybrid(hybrid_top5: list[list]) -> None:
    hits = [hit(results, q) for results, q in zip(hybrid_top5, QUESTIONS, strict=True)]
    recall = sum(hits) / len(hits)
    missed = [q["question"] for q, h in zip(QUESTIONS, hits, strict=True) if not h]
    # The README states "hybrid recall@5 26/26 on the test corpus": every labelled question, exactly.
    assert len(QUESTIONS) == 26 and all(hits), f"recall@5 {recall:.2f}; missed {missed}"


def test_jargon_found_by_hybrid_and_keyword(built: tuple[Index, list[str]], hybrid_top5: list[list]) -> None:
    index, _ = built
    jargon = [(i, q) for i, q in enumerate(QUESTIONS) if q["kind"] == "keyword"]
    assert len(jargon) >= 8
    missed = [q["question"] for i, q in jargon if not hit(hybrid_top5[i], q)]
    assert not missed, f"hybrid missed {missed}"
    missed = [
        q["question"] for _, q in jargon if not hit(index.search(q["question"], k=1, mode="keyword"), q)
    ]
    assert not missed, f"keyword rank 1 missed {missed}"


def test_identifier_beats_generic_words_in_fusion(built: tuple[Index, list[str]]) -> None:
    # "part" matches many chunks; the one chunk that holds XR-7755 must still come first.
    index, _ = built
    top = index.search("XR-7755 part", k=1)[0]
    assert "XR-7755" in top.text and top.heading.endswith("Fault code E-042")


def test_heading_paths(built: tuple[Index, list[str]]) -> None:
    index, _ = built
    top = index.search("V-310", k=1, mode="keyword")[0]
    assert top.source == "manuals/valve-v9.rst"
    assert top.heading == "Norvane V9 Directional Valve > Fault codes > V-310"
    top = index.search("What is the warranty period?", k=1)[0]
    assert top.heading == "Norvane Warranty Policy"
    top = index.search("returns within 30 days RMA", k=1)[0]
    assert (top.source, top.heading) == ("support/faq.html", "Frequently asked questions > Returns")


def test_odd_files(built: tuple[Index, list[str]]) -> None:
    index, warnings = built
    assert len(warnings) == 3, warnings
    for name, reason in [("empty.md", "empty"), ("blob.txt", "binary"), ("scan.pdf", "PDF")]:
        assert any(w.count("\n") == 0 and name in w and reason in w for w in warnings), (name, warnings)
    top = index.search("KZ-5518", k=1)[0]
    assert top.source == "manuals/compressor-k7.txt" and "Température maximale de l'huile: 60 °C" in top.text
    top = index.search("H-204", k=1)[0]
    assert top.source == "support/notes.txt" and "oil level switch" in top.text
    top = index.search("KZ-6001", k=1)[0]
    assert top.source == "manuals/k7-datasheet.pdf" and "Part KZ-6001 filter" in top.text
    top = index.search("T-1002", k=1)[0]
    assert top.source == "support/tickets.jsonl#T-1002"


def test_every_chunk_is_a_slice_of_its_document(built: tuple[Index, list[str]], corpus: Path) -> None:
    index, _ = built
    rows = index._chunk_db().conn.execute("SELECT file, source, start, end, text FROM chunks").fetchall()
    docs = {}
    for file in {r[0] for r in rows}:
        docs |= {d.source: d.text for d in read_documents(corpus / file, file)}
    for _, source, start, end, text in rows:
        assert docs[source][start:end] == text
    assert len(rows) == len(index)


def test_modes_and_scores(built: tuple[Index, list[str]]) -> None:
    index, _ = built
    dense = index.search("How tight should the mounting bolts be?", k=7, mode="dense")
    assert [r.rank for r in dense] == list(range(1, 8))
    assert all(-1.0 <= r.score <= 1.0 for r in dense) and dense == sorted(dense, key=lambda r: -r.score)
    assert index.search("zzzqqq", k=3, mode="keyword") == []
    assert len(index.search("everything", k=1000, mode="hybrid")) <= len(index)
    with pytest.raises(Phi3FastError, match="unknown search mode"):
        index.search("x", mode="sparse")  # type: ignore[arg-type]
    with pytest.raises(Phi3FastError, match="k must be"):
        index.search("x", k=0)


def test_concurrent_queries_from_threads(built: tuple[Index, list[str]]) -> None:
    index, _ = built
    questions = [q["question"] for q in QUESTIONS[:4]]
    expected = {q: index.search(q, k=5) for q in questions}
    errors: list[BaseException] = []
    got: dict[tuple[int, str], list] = {}

    def worker(t: int) -> None:
        try:
            for q in questions[t % 2 :: 2]:
                got[(t, q)] = index.search(q, k=5)
        except BaseException as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(res == expected[q] for (_, q), res in got.items()) and len(got) == 8


def test_incremental_update_and_delete(tmp_path: Path, emb: Embedder) -> None:
    src = small_corpus(tmp_path / "docs")
    out = tmp_path / "idx"
    kw = {"embedder": emb, "chunk_tokens": CHUNK_TOKENS, "overlap": OVERLAP, "progress": False}
    first = Index.build([src], out, **kw)
    assert first.build_stats.files_added == 4 and first.manifest["generation"] == "gen-000001"

    again = Index.build([src], out, **kw)  # nothing changed: nothing embedded, same generation
    assert again.build_stats.chunks_embedded == 0 and again.build_stats.files_unchanged == 4
    assert again.manifest["generation"] == "gen-000001"

    edit_small_corpus(src)
    upd = Index.build([src], out, **kw)
    s = upd.build_stats
    assert (s.files_added, s.files_changed, s.files_deleted, s.files_unchanged) == (1, 1, 1, 2)
    pump_chunks = upd._chunk_db().conn.execute(
        "SELECT COUNT(*) FROM chunks WHERE file = 'manuals/pump-p200.md'"
    )
    assert s.chunks_embedded == pump_chunks.fetchone()[0] + 1
    assert upd.manifest["generation"] == "gen-000002"
    assert upd.search("XR-9999", k=1)[0].source == "manuals/pump-p200.md"
    assert not any("XR-7755" in r.text for r in upd.search("XR-7755", k=10, mode="hybrid"))
    assert upd.search("GX-3141", k=1)[0].source == "manuals/new.md"
    assert not any(r.source == "warranty.md" for r in upd.search("warranty 24 months", k=len(upd)))
    assert not any(r.source == "warranty.md" for r in upd.search("warranty 24 months", k=50, mode="dense"))
    # The old generation stays readable by an index opened before the update.
    assert first.search("XR-7755", k=1)[0].source == "manuals/pump-p200.md"


def test_failed_build_leaves_previous_index_intact(
    tmp_path: Path, emb: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = small_corpus(tmp_path / "docs")
    out = tmp_path / "idx"
    kw = {"embedder": emb, "chunk_tokens": CHUNK_TOKENS, "overlap": OVERLAP, "progress": False}
    before = [r.text for r in Index.build([src], out, **kw).search("E-042", k=3)]
    manifest = (out / "MANIFEST.json").read_bytes()
    (src / "manuals" / "pump-p200.md").write_text("# Pump\n\nRewritten: fault E-042 retired.\n")

    def boom(texts: list[str], progress: bool = True):  # noqa: ANN202
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while embedding

    monkeypatch.setattr(emb, "encode_batches", boom)
    with pytest.raises(KeyboardInterrupt):
        Index.build([src], out, **kw)
    monkeypatch.undo()
    assert (out / "MANIFEST.json").read_bytes() == manifest
    assert not list(out.glob("*.tmp"))
    assert [r.text for r in Index.open(out, embedder=emb).search("E-042", k=3)] == before
    # A crash after the folder rename but before the manifest switch leaves an orphan; the next run removes it.
    (out / "gen-000002").mkdir()
    after = Index.build([src], out, **kw)
    assert after.manifest["generation"] == "gen-000002" and "retired" in after.search("E-042", k=1)[0].text


def _tiny_corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copy(DATA / "corpus" / "manuals" / "controller-c5.txt", root)
    shutil.copy(DATA / "corpus" / "policies" / "warranty.md", root)
    return root


def test_lock_keeps_writers_apart(tmp_path: Path, emb: Embedder) -> None:
    src = _tiny_corpus(tmp_path / "docs")
    out = tmp_path / "idx"
    out.mkdir()
    with open(out / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer
        with pytest.raises(Phi3FastError, match="lock held"):
            Index.build([src], out, embedder=emb, progress=False)
    assert Index.build([src], out, embedder=emb, progress=False).build_stats.files_added == 2


def test_build_errors(tmp_path: Path, emb: Embedder) -> None:
    src = _tiny_corpus(tmp_path / "docs")
    with pytest.raises(Phi3FastError, match="not an index directory"):
        Index.build([src], src, embedder=emb, progress=False)
    with pytest.raises(Phi3FastError, match="exceeds the 256-token window"):
        Index.build([src], tmp_path / "a", embedder=emb, chunk_tokens=512, progress=False)
    with pytest.raises(ArgumentError, match=r"^overlap must be in \[0, chunk_tokens/2\)"):
        Index.build([src], tmp_path / "b", embedder=emb, chunk_tokens=64, overlap=40, progress=False)
    with pytest.raises(ArgumentError, match="^chunk_tokens must be >= 16"):
        Index.build([src], tmp_path / "c", embedder=emb, chunk_tokens=8, progress=False)
    with pytest.raises(ArgumentError, match="^store nowhere: expected 'builtin'"):
        Index.build([src], tmp_path / "d", embedder=emb, store="nowhere", progress=False)


def test_cli_says_flags_for_library_arguments(tmp_path: Path) -> None:
    """The library names its arguments (chunk_tokens); the CLI says the flag (--chunk-tokens), on one line."""
    src = _tiny_corpus(tmp_path / "docs")
    cases = [
        (["--chunk-tokens", "8"], "error: --chunk-tokens must be >= 16, got 8"),
        (["--chunk-tokens", "64", "--overlap", "40"], "error: --overlap must be in [0, chunk_tokens/2)"),
        (["--store", "nowhere"], "error: --store nowhere: expected 'builtin' or 'milvus:URI'"),
    ]
    for i, (args, said) in enumerate(cases):
        result = CliRunner().invoke(main, ["index", str(src), "--out", str(tmp_path / f"i{i}"), *args])
        assert result.exit_code == 2 and result.stderr.startswith(said), result.stderr
    result = CliRunner().invoke(main, ["index", str(src), "--out", str(src)])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: --out {src}: not an index directory")


def _corruptions() -> list[tuple[str, object, str]]:
    def truncate(p: Path) -> None:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    def scramble(p: Path) -> None:
        p.write_bytes(bytes(b ^ 0x5A for b in p.read_bytes()))  # same size: only the contents check can tell

    return [
        (
            "manifest-garbage",
            lambda d: (d / "MANIFEST.json").write_text("{not json"),
            "corrupt index manifest",
        ),
        (
            "manifest-other",
            lambda d: (d / "MANIFEST.json").write_text('{"format": "x"}'),
            "not a phi3fast RAG",
        ),
        ("manifest-missing", lambda d: (d / "MANIFEST.json").unlink(), "not a phi3fast index"),
        ("gen-missing", lambda d: shutil.rmtree(d / "gen-000001"), "missing"),
        ("vectors-truncated", lambda d: truncate(d / "gen-000001" / "vectors.hnsw"), "truncated"),
        ("db-truncated", lambda d: truncate(d / "gen-000001" / "chunks.sqlite"), "truncated"),
        ("db-scrambled", lambda d: scramble(d / "gen-000001" / "chunks.sqlite"), "corrupt chunk database"),
        ("vectors-scrambled", lambda d: scramble(d / "gen-000001" / "vectors.hnsw"), "vector index"),
    ]


@pytest.fixture(scope="module")
def small_index(emb: Embedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    Index.build([_tiny_corpus(root / "docs")], root / "idx", embedder=emb, progress=False)
    return root / "idx"


@pytest.mark.parametrize(
    "name, damage, message", _corruptions(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_corrupt_index_is_one_clear_error(
    small_index: Path, tmp_path: Path, name: str, damage, message: str
) -> None:
    idx = tmp_path / "idx"
    shutil.copytree(small_index, idx)
    damage(idx)
    with pytest.raises(Phi3FastError, match=message):
        Index.open(idx)
    result = CliRunner().invoke(main, ["query", "E-042", "--index", str(idx), "--mode", "keyword"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


def test_rebuild_over_a_corrupt_index(small_index: Path, tmp_path: Path, emb: Embedder) -> None:
    idx = tmp_path / "idx"
    shutil.copytree(small_index, idx)
    vec = idx / "gen-000001" / "vectors.hnsw"
    vec.write_bytes(vec.read_bytes()[:100])
    warnings: list[str] = []
    index = Index.build(
        [small_index.parent / "docs"], idx, embedder=emb, progress=False, warn=warnings.append
    )
    assert (
        len(warnings) == 1
        and "truncated" in warnings[0]
        and "rebuilding the index from scratch" in warnings[0]
    )
    assert index.build_stats.files_added == 2 and index.search("C5-21", k=1)[0].source == "controller-c5.txt"


def test_missing_index_and_other_embedder(small_index: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["query", "x", "--index", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not a phi3fast index (no such directory)" in result.stderr
    with pytest.raises(Phi3FastError, match="built with embedder 'all-MiniLM-L6-v2'"):
        Index.open(small_index, embedder="sentence-transformers/all-mpnet-base-v2")
    result = CliRunner().invoke(
        main, ["query", "x", "--index", str(small_index), "--embedder", str(tmp_path)]
    )
    assert result.exit_code == 2 and "cannot be searched with" in result.stderr


def test_cli_json_schema_and_from_file(built: tuple[Index, list[str]], tmp_path: Path) -> None:
    index, _ = built
    result = CliRunner().invoke(
        main, ["query", "What does E-117 mean?", "--index", str(index.path), "--json"]
    )
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert set(obj) == {"question", "results", "answer"} and obj["answer"] is None
    assert obj["question"] == "What does E-117 mean?" and len(obj["results"]) == 5
    for rank, r in enumerate(obj["results"], 1):
        assert set(r) == {"rank", "source", "heading", "score", "text", "start", "end"}
        assert r["rank"] == rank and isinstance(r["score"], float) and 0 <= r["start"] < r["end"]
    assert "E-117" in obj["results"][0]["text"]

    qfile = tmp_path / "q.txt"
    qfile.write_text("E-042\n\nHow long is the warranty?\n")
    result = CliRunner().invoke(
        main, ["query", "--from-file", str(qfile), "--index", str(index.path), "-k", "2"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["question"] for o in lines] == ["E-042", "How long is the warranty?"]
    assert all(len(o["results"]) == 2 for o in lines)

    result = CliRunner().invoke(main, ["query", "E-042", "--index", str(index.path), "-k", "2"])
    assert result.exit_code == 0 and "[1] manuals/pump-p200.md  > " in result.stdout
    result = CliRunner().invoke(main, ["query", "--index", str(index.path)])
    assert result.exit_code == 2 and "give one QUESTION or --from-file" in result.stderr


def test_cli_index_verb(tmp_path: Path) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.md").write_text("# A\n\nPart QX-1 fits the K7.\n")
    (src / "b.txt").write_bytes(b"")
    out = tmp_path / "idx"
    result = CliRunner().invoke(
        main, ["index", str(src), "--out", str(out), "--chunk-tokens", "64", "--overlap", "8"]
    )
    assert result.exit_code == 0, result.output
    assert f"{out}: 1 chunks from 1 files (added 1" in result.stdout
    assert "warning: " in result.stderr and "b.txt: skipped: empty file" in result.stderr
    result = CliRunner().invoke(main, ["index", str(src), "--out", str(out)])  # keeps 64/8 from the manifest
    assert result.exit_code == 0 and "unchanged 1" in result.stdout and "embedded 0 chunks" in result.stdout
    assert json.loads((out / "MANIFEST.json").read_text())["chunk_tokens"] == 64
    (src / "a.md").unlink()  # nothing left to index: an empty index, searchable, with no results
    result = CliRunner().invoke(main, ["index", str(src), "--out", str(out)])
    assert result.exit_code == 0 and "0 chunks from 0 files" in result.stdout and "deleted 1" in result.stdout
    result = CliRunner().invoke(main, ["query", "QX-1", "--index", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["results"] == []


# -- answers with a model (--model): the tiny model's text is gibberish, so these check the prompt, the
# streaming, the sources and the JSON, not the answer's quality.


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from phi3fast.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "phi3")


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path):  # noqa: ANN201
    from phi3fast.model import load

    return load(tiny_model_dir)


def _passages(n: int) -> list:
    from phi3fast.rag import SearchResult

    return [
        SearchResult(
            i,
            f"manuals/doc{i}.md",
            f"Doc {i} > Part" if i % 2 else "",
            1.0 / i,
            f"Passage {i}: XR-{i}.",
            0,
            18,
        )
        for i in range(1, n + 1)
    ]


def test_answer_prompt_structure(tiny_model) -> None:  # noqa: ANN001
    from phi3fast.generate import chat_prompt_ids
    from phi3fast.rag.answer import SYSTEM_PROMPT, build_messages

    messages = build_messages("  What is XR-2? ", _passages(3))
    assert [m["role"] for m in messages] == ["system", "user"] and messages[0]["content"] == SYSTEM_PROMPT
    user = messages[1]["content"]
    assert user.startswith("Passages:\n\n[1] (manuals/doc1.md > Doc 1 > Part)\nPassage 1: XR-1.\n\n")
    assert "\n\n[2] (manuals/doc2.md)\nPassage 2: XR-2.\n\n[3] (" in user
    assert user.endswith("\n\nQuestion: What is XR-2?")
    prompt = tiny_model.tokenizer.decode(chat_prompt_ids(tiny_model, messages))
    assert (
        prompt.index("<|system|>")
        < prompt.index("<|user|>")
        < prompt.index("[1] (manuals")
        < prompt.index("<|assistant|>")
    )


def test_answer_fits_the_context_window(tiny_model) -> None:  # noqa: ANN001
    from phi3fast.generate import chat_prompt_ids
    from phi3fast.rag.answer import build_messages, fit_passages

    passages, q = _passages(5), "What is XR-2?"
    window = tiny_model.config.max_position_embeddings
    two = len(chat_prompt_ids(tiny_model, build_messages(q, passages[:2])))
    assert fit_passages(tiny_model, q, passages, window - two) == passages[:2]
    assert fit_passages(tiny_model, q, passages, window - two + 1) == passages[:1]
    assert fit_passages(tiny_model, q, passages, 16) == passages


def test_answer_streams_and_lists_cited_sources(tiny_model) -> None:  # noqa: ANN001
    from phi3fast.generate import generate_text
    from phi3fast.rag.answer import AnswerConfig, build_messages, cited, sources_block, stream_answer

    passages = _passages(3)
    kept, stream = stream_answer(tiny_model, "What is XR-2?", passages, AnswerConfig(max_new_tokens=12))
    pieces = list(stream)
    assert kept == passages and len(pieces) > 1
    assert "".join(pieces) == generate_text(
        tiny_model, build_messages("What is XR-2?", kept), max_new_tokens=12
    )
    assert cited("See [3] and [1][3]; not [0] or [9].", 3) == [3, 1]
    block = sources_block(passages, "XR-2 is a part [2].")
    assert block.splitlines() == [
        "Sources:",
        " [1] manuals/doc1.md > Doc 1 > Part (chars 0-18)",
        "*[2] manuals/doc2.md (chars 0-18)",
        " [3] manuals/doc3.md > Doc 3 > Part (chars 0-18)",
    ]


def test_cli_query_with_model(built: tuple[Index, list[str]], tiny_model_dir: Path, tmp_path: Path) -> None:
    index, _ = built
    args = [
        "query",
        "What does E-042 mean?",
        "--index",
        str(index.path),
        "-k",
        "3",
        "--model",
        str(tiny_model_dir),
    ]
    result = CliRunner().invoke(main, [*args, "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("Q: What does E-042 mean?\nA: ")
    sources = out[out.index("\nSources:\n") :].splitlines()[2:]
    assert len(sources) == 3 and sources[0][1:].startswith("[1] manuals/pump-p200.md > ")
    result = CliRunner().invoke(main, [*args, "--max-new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert isinstance(obj["answer"], str) and obj["answer"] and len(obj["results"]) == 3
    assert obj["answer"] in out  # greedy: the streamed text and the JSON answer are the same
    result = CliRunner().invoke(main, ["query", "x", "--index", str(index.path), "--adapter", str(tmp_path)])
    assert result.exit_code == 2 and "--adapter needs --model" in result.stderr


def test_unreadable_file_is_skipped_with_a_warning(
    tmp_path: Path, emb: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    (src / "ok.md").write_text("# OK\n\nPart QX-2 is fine.\n")
    (src / "locked.md").write_text("# Locked\n\nSecret.\n")
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:  # root ignores chmod, so simulate the permission error
        if self.name == "locked.md":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    warnings: list[str] = []
    index = Index.build([src], tmp_path / "idx", embedder=emb, progress=False, warn=warnings.append)
    assert warnings == [f"{src / 'locked.md'}: skipped: unreadable (Permission denied)"]
    assert index.build_stats.files_skipped == 1 and len(index) == 1
