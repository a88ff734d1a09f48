"""RAG readers and chunking, without an embedder: decoding, HTML/PDF/JSONL, heading paths, token windows."""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

import pytest

from phi3fast.errors import Phi3FastError
from phi3fast.rag.chunking import _windows, chunk_document, sections
from phi3fast.rag.readers import (
    Document,
    SkipFile,
    decode_text,
    html_to_text,
    iter_files,
    plain_title,
    read_documents,
)
from phi3fast.rag.stores.keywords import fts_query, identifiers


def make_pdf(lines: list[str]) -> bytes:
    """A minimal one-page PDF whose text layer holds `lines` (Helvetica, ASCII), with a correct xref table."""
    ops = " ".join(f"({ln}) Tj 0 -16 Td" for ln in lines)
    stream = f"BT /F1 12 Tf 72 720 Td {ops} ET".encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


TEXT = "Température de service: 60 °C. Pièce KZ-5518, défaut H-204.\n"


@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252"]
)
def test_decode_text_encodings(encoding: str) -> None:
    text = TEXT + ("“quoted”\n" if encoding in ("cp1252", "utf-8", "utf-8-sig", "utf-16", "utf-32") else "")
    assert decode_text(text.encode(encoding)) == text


def test_decode_text_utf16_with_bom_keeps_no_bom() -> None:
    data = codecs.BOM_UTF16_LE + TEXT.encode("utf-16-le")
    assert decode_text(data) == TEXT


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"  \n\t\n", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, "binary"),
        (bytes(range(1, 32)) * 50, "binary"),
    ],
)
def test_decode_text_skips(data: bytes, reason: str) -> None:
    with pytest.raises(SkipFile, match=reason):
        decode_text(data)


def test_html_to_text_drops_scripts_and_marks_headings() -> None:
    text = html_to_text(
        "<html><head><title>t</title><style>p{}</style></head><body><script>var x = 1;</script>"
        "<h1>Manual</h1><p>Intro &amp; scope.</p><h2>Faults</h2><p>E-042 means <b>open</b> wire.</p></body></html>"
    )
    assert "var x" not in text and "p{}" not in text
    assert "# Manual" in text and "## Faults" in text
    assert "Intro & scope." in text and "E-042 means open wire." in text
    secs = sections(text, "markdown")
    assert [h for h, _, _ in secs] == ["Manual", "Manual > Faults"]


def test_sections_markdown_heading_paths_and_fences() -> None:
    text = (
        "Preamble.\n\n# Title\n\nIntro.\n\n## A\n\nText A.\n\n```bash\n# not a heading\necho hi\n```\n\n"
        "### A1 ###\n\nText A1.\n\n## B\n\nText B.\n\nSetext\n------\n\nUnder setext.\n"
    )
    secs = sections(text, "markdown")
    assert [h for h, _, _ in secs] == [
        "",
        "Title",
        "Title > A",
        "Title > A > A1",
        "Title > B",
        "Title > Setext",
    ]
    body_a = text[secs[2][1] : secs[2][2]]
    assert "# not a heading" in body_a and "### A1" not in body_a


def test_sections_rst_levels_by_underline_order() -> None:
    text = "=====\nTitle\n=====\n\nIntro.\n\nPart\n====\n\nP.\n\nSub\n---\n\nS.\n\nPart two\n========\n\nQ.\n"
    assert [h for h, _, _ in sections(text, "rst")] == [
        "Title",
        "Title > Part",
        "Title > Part > Sub",
        "Title > Part two",
    ]


def test_sections_plain_is_one_section() -> None:
    assert sections("# not markdown\ntext\n", "plain") == [("", 0, 20)]


@pytest.mark.parametrize(
    "text, title",
    [
        ("DRIVELINE DL-3 QUICK REFERENCE\nF07  Earth fault.\n", "DRIVELINE DL-3 QUICK REFERENCE"),
        ("\n  Pump P-3 notes  \n\nText.", "Pump P-3 notes"),
        ("The pump runs at 2900 rpm.\nMore text.\n", ""),  # a sentence, not a title
        ("Only one line, no body", ""),
        ("x" * 101 + "\nbody", ""),  # a paragraph
    ],
)
def test_plain_title(text: str, title: str) -> None:
    assert plain_title(text) == title


def test_plain_text_title_heads_every_chunk(tmp_path: Path) -> None:
    f = tmp_path / "dl3.txt"
    f.write_text(
        "DRIVELINE DL-3 QUICK REFERENCE\n\n"
        + " ".join(f"word{i}" for i in range(300))
        + "\nF07 Earth fault.\n"
    )
    (doc,) = read_documents(f, "dl3.txt")
    chunks = chunk_document(doc, _word_offsets, lambda heading: 40, 8)
    assert len(chunks) > 3 and all(c.heading == "DRIVELINE DL-3 QUICK REFERENCE" for c in chunks)
    assert all(c.text == doc.text[c.start : c.end] for c in chunks)
    md = tmp_path / "a.md"
    md.write_text("First line\n\nbody text\n")
    assert read_documents(md, "a.md")[0].title == ""  # markdown names its own sections


def _word_offsets(texts: list[str]) -> list[list[tuple[int, int]]]:
    """A stand-in tokenizer: words split into 3-character pieces (so words span several tokens)."""
    out = []
    for t in texts:
        spans = []
        for m in re.finditer(r"\S+", t):
            spans += [(s, min(s + 3, m.end())) for s in range(m.start(), m.end(), 3)]
        out.append(spans)
    return out


@pytest.mark.parametrize("n_words", [1, 17, 130])
@pytest.mark.parametrize("budget, overlap", [(16, 0), (24, 4), (64, 8)])
def test_windows_cover_everything_within_budget(n_words: int, budget: int, overlap: int) -> None:
    text = " ".join(f"w{i:03d}x" for i in range(n_words))  # each word: 2 tokens ("w00", "0x")
    offsets = _word_offsets([text])[0]
    wins = _windows(offsets, budget, overlap)
    covered = set()
    for i, j in wins:
        assert 0 < j - i <= budget
        covered |= set(range(i, j))
        assert i == 0 or offsets[i][0] != offsets[i - 1][1], "window starts inside a word"
        assert j == len(offsets) or offsets[j][0] != offsets[j - 1][1], "window ends inside a word"
    assert covered == set(range(len(offsets)))
    for (i0, j0), (i1, _) in zip(wins, wins[1:], strict=False):
        assert i0 < i1 <= j0 and j0 - i1 <= overlap


def test_chunk_offsets_point_into_the_document() -> None:
    text = "# Pump\n\nIntro text here.\n\n## Faults\n\n" + " ".join(
        f"E-{i:03d} means fault {i}." for i in range(60)
    )
    doc = Document("pump.md", text, "markdown")
    chunks = chunk_document(doc, _word_offsets, lambda heading: 20, 4)
    assert len(chunks) > 3
    assert {c.heading for c in chunks} == {"Pump", "Pump > Faults"}
    for c in chunks:
        assert c.text == text[c.start : c.end] and c.text.strip() == c.text
        assert c.embed_text().startswith(c.heading + "\n")
    # Every fault code appears whole in some chunk (windows never cut inside a word).
    for i in range(60):
        assert any(f"E-{i:03d}" in c.text for c in chunks)


def test_jsonl_records(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    rows = [
        {"id": "T-1", "text": "alpha"},
        {"text": "beta", "source": "kb/beta"},
        {"text": "gamma"},
        {"text": " "},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = read_documents(p, "t.jsonl")
    assert [(d.source, d.text) for d in docs] == [
        ("t.jsonl#T-1", "alpha"),
        ("kb/beta", "beta"),
        ("t.jsonl#3", "gamma"),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "t.jsonl:2: invalid JSON"),
        ('{"txt": "x"}', "t.jsonl:2: expected an object with a string 'text'"),
        ('["text"]', "t.jsonl:2: expected an object"),
        ('{"text": "x", "id": [1]}', "t.jsonl:2: 'id' must be a string or an integer"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(Phi3FastError, match=re.escape(message)):
        read_documents(p, "t.jsonl")


def test_pdf_text_layer_and_broken_pdf(tmp_path: Path) -> None:
    p = tmp_path / "m.pdf"
    p.write_bytes(make_pdf(["Compressor K7 manual", "Fault H-204 means low oil."]))
    (doc,) = read_documents(p, "m.pdf")
    assert "Fault H-204 means low oil." in doc.text and doc.markup == "plain"
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4\ngarbage" * 10)
    with pytest.raises(SkipFile, match="PDF"):
        read_documents(bad, "bad.pdf")


def test_iter_files_relative_sources_hidden_and_collisions(tmp_path: Path) -> None:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / ".git").mkdir()
    (tmp_path / "a" / "x.md").write_text("x")
    (tmp_path / "a" / "sub" / "y.txt").write_text("y")
    (tmp_path / "a" / ".git" / "z.md").write_text("z")
    (tmp_path / "a" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.md").write_text("other x")
    found = list(iter_files([tmp_path / "a"]))
    assert [s for _, s in found] == ["sub/y.txt", "x.md"]
    with pytest.raises(Phi3FastError, match="same source path 'x.md'"):
        list(iter_files([tmp_path / "a", tmp_path / "b"]))
    with pytest.raises(Phi3FastError, match="no such file"):
        list(iter_files([tmp_path / "missing"]))


def test_identifiers_and_safe_fts_queries() -> None:
    assert identifiers("What is XR-7731 and E-042, CR2032 or 4.2.1 at 24 volts?") == [
        "XR-7731",
        "E-042",
        "CR2032",
        "4.2.1",
    ]
    assert fts_query("the of and") is None
    q = fts_query('pump "seal" (NOT) NEAR* -x')
    assert q == '"pump" OR "seal" OR "NOT" OR "NEAR" OR "x"'


@pytest.mark.parametrize(
    "question",
    [
        '"',
        'say "hi',
        "(E-042",
        "E-042)",
        "AND",
        "OR NOT",
        "NEAR(a b)",
        "pump*",
        "^x",
        "a:b",
        "col:XR-7731",
        "_",
        "-",
    ],
)
def test_keyword_search_never_raises_on_user_text(tmp_path: Path, question: str) -> None:
    import numpy as np

    from phi3fast.rag.stores.sqlite import ChunkDB

    store = ChunkDB(tmp_path / "c.sqlite")
    store.begin()
    rows = [("m.md", "Faults", 0, 30, "Fault E-042: replace XR-7731 now."), ("m.md", "", 31, 40, "a:b pump")]
    store.add_chunks("m.md", rows, np.zeros((2, 4), np.float32))
    store.commit()
    store.keyword_search(question, 5)  # must not raise sqlite3.OperationalError
    store.identifier_search(question, 5)
    assert [i for i, _ in store.keyword_search("e-042", 5)] == [1]
    assert [i for i, _ in store.identifier_search("what is XR-7731?", 5)] == [1]
    assert [i for i, _ in store.keyword_search("XR 7731", 5)] == [
        1
    ]  # the phrase xr 7731, however it is written
    store.close()


def test_rrf_fuse_ranks_not_scores() -> None:
    from phi3fast.rag.index import RRF_K, rrf_fuse

    dense = [(1, 0.99), (2, 0.50), (3, 0.10)]
    keyword = [(3, 42.0), (2, 1.0)]
    fused = rrf_fuse(dense, keyword, [])
    # 3 (ranks 3 and 1) edges out 2 (ranks 2 and 2): 1/63 + 1/61 > 2/62; 1 is in one list only.
    assert [i for i, _ in fused] == [3, 2, 1]
    assert fused[0][1] == pytest.approx(1 / (RRF_K + 3) + 1 / (RRF_K + 1))
    assert fused[1][1] == pytest.approx(2 / (RRF_K + 2))
    assert fused[2][1] == pytest.approx(1 / (RRF_K + 1))
    assert rrf_fuse() == []
