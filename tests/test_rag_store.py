"""The built-in store's files: SQLite URIs for any path, and readers that stay valid while the index is rebuilt
under them (a server holds an Index open for days while `phi3fast index` runs)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from phi3fast.errors import Phi3FastError
from phi3fast.rag import Index
from phi3fast.rag.embedders import Embedder, shared_embedder
from phi3fast.rag.stores.sqlite import ChunkDB, sqlite_uri


@pytest.fixture(scope="module")
def emb() -> Embedder:
    return shared_embedder()


def _docs(root: Path, code: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "valve.md").write_text(f"# Valve V-7\n\n## Spares\n\nThe seal kit for the V-7 valve is {code}.\n")
    (root / "pump.txt").write_text("The P-3 pump runs at 2900 rpm and needs grease every 2000 hours.\n")
    return root


def _keyword_texts(view: object, question: str, out: list[str]) -> None:
    out += [r.text for r in view.rows([i for i, _ in view.keyword(question, 3)]).values()]


def _gens(idx: Path) -> set[str]:
    return {p.name for p in idx.glob("gen-*")}


@pytest.mark.parametrize("name", ["a?b", "c#d", "50%", "e%3Fx", "sp ace&k=v"])
def test_sqlite_uri_opens_exactly_that_file(tmp_path: Path, name: str) -> None:
    d = tmp_path / name
    d.mkdir()
    db = ChunkDB(d / "chunks.sqlite")
    db.close()
    conn = sqlite3.connect(sqlite_uri(d / "chunks.sqlite", readonly=True), uri=True)
    try:
        assert Path(conn.execute("PRAGMA database_list").fetchone()[2]) == d / "chunks.sqlite"
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("CREATE TABLE t(x)")
    finally:
        conn.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no stray database beside it


@pytest.mark.parametrize("name", ["idx?mode=rw", "idx#1", "idx%20x"])
def test_index_in_a_folder_with_uri_characters(tmp_path: Path, emb: Embedder, name: str) -> None:
    docs = _docs(tmp_path / "docs", "SK-4410")
    Index.build([docs], tmp_path / name, embedder=emb, progress=False)
    (docs / "pump.txt").write_text("The P-3 pump now needs grease every 1500 hours.\n")
    index = Index.build(
        [docs], tmp_path / name, embedder=emb, progress=False
    )  # copies the previous generation
    assert index.build_stats.files_changed == 1
    again = Index.open(tmp_path / name)
    assert again.search("SK-4410", k=1, mode="keyword")[0].source == "valve.md"
    assert "1500" in again.search("grease interval of the pump", k=1)[0].text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["docs", name])


def test_a_new_thread_after_two_rebuilds_searches_the_current_build(tmp_path: Path, emb: Embedder) -> None:
    docs, idx = _docs(tmp_path / "docs", "SK-1000"), tmp_path / "idx"
    index = Index.build([docs], idx, embedder=emb, progress=False)
    assert index.search("SK-1000", k=1, mode="keyword")[0].source == "valve.md"
    for code in ("SK-1001", "SK-1002"):
        _docs(docs, code)
        Index.build([docs], idx, embedder=emb, progress=False)
    got: list = []

    def search() -> None:  # this thread has no connection yet: it opens one now
        try:
            got.append(index.search("seal kit SK-1002", k=1))
        except Phi3FastError as e:
            got.append(e)

    t = threading.Thread(target=search)
    t.start()
    t.join()
    assert not isinstance(got[0], Exception), got[0]
    assert "SK-1002" in got[0][0].text  # the open index follows the rebuilds
    assert index.manifest["generation"] == "gen-000003"


def test_a_view_in_use_keeps_its_generation(tmp_path: Path, emb: Embedder) -> None:
    docs, idx = _docs(tmp_path / "docs", "SK-2000"), tmp_path / "idx"
    index = Index.build([docs], idx, embedder=emb, progress=False)
    view = index.store.view()  # a search that started before the rebuilds
    for code in ("SK-2001", "SK-2002", "SK-2003"):
        _docs(docs, code)
        Index.build([docs], idx, embedder=emb, progress=False)
    assert "gen-000001" in _gens(idx)  # pinned: the builds left it
    texts: list[str] = []
    t = threading.Thread(target=_keyword_texts, args=(view, "SK-2000", texts))
    t.start()
    t.join()
    assert any("SK-2000" in text for text in texts)
    # Once nothing holds it, the next build removes it (and every generation but the last two).
    assert "SK-2003" in index.search("SK-2003", k=1, mode="keyword")[0].text
    del view
    _docs(docs, "SK-2004")
    Index.build([docs], idx, embedder=emb, progress=False)
    assert _gens(idx) == {"gen-000004", "gen-000005"}
    index.close()


def test_searches_from_threads_during_rebuilds(tmp_path: Path, emb: Embedder) -> None:
    docs, idx = _docs(tmp_path / "docs", "SK-3000"), tmp_path / "idx"
    index = Index.build([docs], idx, embedder=emb, progress=False)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: set[str] = set()

    def reader() -> None:
        while not stop.is_set():
            try:
                for r in index.search("seal kit for the V-7 valve", k=2):
                    seen.update(w for w in r.text.replace(".", " ").split() if w.startswith("SK-"))
            except BaseException as e:
                errors.append(e)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for code in ("SK-3001", "SK-3002", "SK-3003", "SK-3004"):
            _docs(docs, code)
            Index.build([docs], idx, embedder=emb, progress=False)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert "SK-3004" in index.search("seal kit for the V-7 valve", k=1)[0].text and seen <= {
        f"SK-300{i}" for i in range(5)
    }


def test_rebuilt_with_another_embedder_is_a_clear_error(tmp_path: Path, emb: Embedder) -> None:
    docs, idx = _docs(tmp_path / "docs", "SK-5000"), tmp_path / "idx"
    index = Index.build([docs], idx, embedder=emb, progress=False)
    m = index.manifest
    # Another embedder's build, as its manifest tells it (a second real model is not needed to test the check).
    shutil.copytree(idx / "gen-000001", idx / "gen-000002")
    other = {**m, "generation": "gen-000002", "embedder": {**m["embedder"], "name": "other-model", "dim": 8}}
    (idx / "MANIFEST.json").write_text(json.dumps(other))
    with pytest.raises(Phi3FastError, match="rebuilt with embedder 'other-model'.*open it again"):
        index.search("SK-5000", k=1, mode="keyword")
