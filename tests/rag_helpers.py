"""The labelled RAG corpus (tests/data/rag) and the edits the incremental-update tests make to it; shared by the
built-in store's tests and the Milvus store's, which must behave the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from phi3fast.rag import Index
from phi3fast.rag.embedders import shared_embedder

DATA = Path(__file__).resolve().parent / "data" / "rag"
QUESTIONS = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line.strip()]
CHUNK_TOKENS, OVERLAP = 128, 16  # smaller than the default so sections split into several chunks


def index_of(docs: dict[str, str], tmp_path_factory) -> Index:  # noqa: ANN001
    """An index over files named and written from `docs`, with the shared MiniLM embedder."""
    root = tmp_path_factory.mktemp("docs")
    for name, text in docs.items():
        (root / name).write_text(text)
    return Index.build(
        [root], tmp_path_factory.mktemp("idx") / "i", embedder=shared_embedder(), progress=False
    )


def hit(results: list, q: dict) -> bool:
    """A labelled question is answered when a result comes from its source and holds the expected text."""
    return any(r.source == q["source"] and q["expect"] in r.text for r in results)


def small_corpus(root: Path) -> Path:
    """Four files: the manuals and the warranty policy."""
    shutil.copytree(DATA / "corpus" / "manuals", root / "manuals")
    shutil.copy(DATA / "corpus" / "policies" / "warranty.md", root / "warranty.md")
    return root


def edit_small_corpus(root: Path) -> None:
    """One file changed (XR-7755 becomes XR-9999), one deleted (warranty.md), one added (manuals/new.md, GX-3141)."""
    pump = root / "manuals" / "pump-p200.md"
    pump.write_text(pump.read_text().replace("XR-7755", "XR-9999"))
    (root / "warranty.md").unlink()
    (root / "manuals" / "new.md").write_text(
        "# Gearbox G4\n\nThe G4 gearbox needs oil GX-3141 every 500 hours.\n"
    )
