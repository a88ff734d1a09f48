"""Model codes match in all their spellings (keywords.py, "Note: one code, several spellings")."""

from __future__ import annotations

import pytest
from rag_helpers import index_of

from phi3fast.rag import Index
from phi3fast.rag.stores.keywords import identifier_forms, identifier_queries

# Two near-duplicate manuals: the code is "CP-200" in one text, "CP250" in the other (file names without codes,
# so only the text can match). Filler words make every chunk a keyword match for a plain question.
DOCS = {
    "pump_a.md": "# Pump manual\n\nThe CP-200 seal is changed every year. The pump seal kit fits it.\n",
    "pump_b.md": "# Pump manual\n\nThe seal kit KB-SEAL-2500 fits the CP250 only. The pump seal is checked.\n",
    "valve.md": "# Valve manual\n\nThe valve seal is changed with the pump stopped.\n",
}


def test_identifier_forms() -> None:
    assert identifier_forms("CP-200") == ["CP-200", "CP200"]
    assert identifier_forms("CP200") == ["CP200", "CP 200"]
    assert identifier_forms("AC75-SEP-03") == ["AC75-SEP-03", "AC75SEP03", "AC 75 SEP 03"]
    assert identifier_forms("E-042") == ["E-042", "E042"]
    assert identifier_forms("4.2.1") == ["4.2.1"]  # no letters: joining would make another number
    assert identifier_queries("CP200 and F07?") == [
        '("CP200" OR "CP 200") AND ("F07" OR "F 07")',
        '("CP200" OR "CP 200") OR ("F07" OR "F 07")',
    ]


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    return index_of(DOCS, tmp_path_factory)


@pytest.mark.parametrize(
    ("question", "source"),
    [
        ("CP200 seal", "pump_a.md"),  # typed joined; the text says CP-200
        ("CP-250 seal", "pump_b.md"),  # typed with a hyphen; the text says CP250
    ],
)
def test_code_matches_in_any_spelling(index: Index, question: str, source: str) -> None:
    hits = index.store.view().identifier(question, 10)
    sources = {r.source for r in index.store.view().rows([cid for cid, _ in hits]).values()}
    assert sources == {source}  # only the document with that code, whatever its spelling
    assert index.search(question, k=1)[0].source == source
