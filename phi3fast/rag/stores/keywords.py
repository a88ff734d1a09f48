"""Keyword search text: the FTS5 tokenizer both stores match with, safe FTS5 queries, and code-like identifiers.

FTS5 and jargon
---------------
The FTS5 tokenizer is `porter unicode61`: it splits "XR-7731" into the tokens xr, 7731 and "E-042" into e, 042.
User text never reaches FTS5 as syntax: every word is turned into a quoted FTS5 string, which FTS5 tokenizes
the same way, so "XR-7731" becomes the *phrase* xr 7731 (adjacent tokens in that order): an exact match for the
part number that also matches "XR 7731", and that an FTS5 syntax error cannot come from (quotes, parentheses,
AND/NEAR/* in a question are just text). Words are OR-ed and BM25 ranks by how rare the matched ones are, so
a rare fault code dominates the common words around it.

Note: one code, several spellings
---------------------------------
Model codes are written with and without their separator: the CP-200 pump is "CP-200" in its manual's text,
"cp200" in its file name (pump_cp200.md) and in part numbers (CP200-SEAL), and a user may type "CP200" or
"CP 200". FTS5 tokenizes these differently (cp 200 versus cp200), so a phrase match on the spelling the user
typed misses the others. An identifier that mixes letters and digits is therefore matched in its spellings
(identifier_forms): as written, joined (cp200) and split where letters meet digits (cp 200). This is a
query-time rewrite only: every index, old or new, in either store, matches the same way.
"""

from __future__ import annotations

import re
import sqlite3
import threading

# Lowercase, accents folded, English words stemmed ("rattling" and "rattle" are both "rattl"), split at
# non-alphanumerics ("XR-7731" is xr 7731). The Milvus store feeds its BM25 the text tokenized by this same
# tokenizer (fts_tokens), so both stores match the same words.
TOKENIZER = "porter unicode61 remove_diacritics 2"
_tokenizer_db = threading.local()

# Common English words carry no signal for BM25 and only slow the OR query down.
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i if in is it of on or my our should the this to "
    "was we what when where which who why will with you your".split()
)
_WORD = re.compile(r"\w+(?:[-./:]\w+)*")


def identifiers(question: str) -> list[str]:
    """Code-like words of the question: part numbers, fault codes, versions (XR-7731, E-042, CR2032, 4.2.1).

    A word with a digit and a letter or separator; plain numbers ("24 volts") and words are not identifiers.
    """
    out: list[str] = []
    for w in _WORD.findall(question):
        if any(c.isdigit() for c in w) and any(c.isalpha() or c in "-./:" for c in w) and w not in out:
            out.append(w)
    return out


def identifier_forms(word: str) -> list[str]:
    """The spellings an identifier is matched in: as written, joined and split at letter/digit boundaries.

    "CP-200" -> ["CP-200", "CP200"]; "CP200" -> ["CP200", "CP 200"]. Only for words with both letters and
    digits: a version or a number ("4.2.1") joined would be a different number.
    """
    forms = [word]
    if any(c.isalpha() for c in word) and any(c.isdigit() for c in word):
        joined = "".join(c for c in word if c.isalnum())
        split = " ".join(re.findall(r"[^\W\d_]+|\d+", word))
        forms += [f for f in (joined, split) if f.lower() not in {x.lower() for x in forms}]
    # Spellings that FTS5 tokenizes alike (CP-200 and CP 200 are both the phrase cp 200) are kept once.
    seen, out = set(), []
    for f in forms:
        key = " ".join(_tokens_of(f))
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _tokens_of(text: str) -> list[str]:
    """FTS5's split of a word into tokens, for comparing spellings (unicode61: runs of letters and digits)."""
    return [t.lower() for t in re.findall(r"[^\W_]+", text)]


def fts_tokens(texts: list[str]) -> list[list[str]]:
    """Each text's tokens, in order, as the FTS5 table indexes them (via an in-memory FTS5 table and its
    fts5vocab 'instance' view)."""
    db = getattr(_tokenizer_db, "db", None)
    if db is None:
        db = sqlite3.connect(":memory:")
        db.execute(f"CREATE VIRTUAL TABLE t USING fts5(x, tokenize='{TOKENIZER}')")
        db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        _tokenizer_db.db = db
    out: list[list[str]] = [[] for _ in texts]
    with db:
        db.executemany("INSERT INTO t(rowid, x) VALUES (?, ?)", enumerate(texts))
        for term, doc in db.execute("SELECT term, doc FROM v ORDER BY doc, offset"):
            out[doc].append(term)
        db.execute("DELETE FROM t")
    return out


def quote(term: str) -> str:
    """An FTS5 string literal: the term as a phrase of its tokens, never as query syntax."""
    return '"' + term.replace('"', '""') + '"'


def query_terms(question: str) -> list[str]:
    """The words of a question worth searching for: stopwords dropped, each word once."""
    terms: list[str] = []
    for w in _WORD.findall(question):
        if w.lower() in _STOPWORDS or w in terms:
            continue
        terms.append(w)
    return terms


def fts_query(question: str) -> str | None:
    """A safe FTS5 MATCH expression for free text: quoted terms OR-ed together; None if nothing searchable."""
    terms = query_terms(question)
    if not terms:
        return None
    return " OR ".join(quote(t) for t in terms)


def identifier_queries(question: str) -> list[str]:
    """FTS5 MATCH expressions for the question's identifiers: all of them, then any of them; [] if none."""
    ids = identifiers(question)
    if not ids:
        return []
    each = ["(" + " OR ".join(map(quote, identifier_forms(w))) + ")" for w in ids]
    return [" AND ".join(each), " OR ".join(each)]
