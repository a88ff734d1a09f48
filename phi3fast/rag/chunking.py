"""Split a document into overlapping windows of the embedder's tokens, each carrying its heading path.

Sections first: markdown ATX (`## Title`) and setext/rST underlined headings start a section, and the stack of
open headings ("Manual > Troubleshooting > Fault codes") becomes the context of every chunk in it (a plain-text
file's title line, Document.title, heads the path). Headings
inside fenced code blocks are code, not headings. Then each section body is cut into windows of at most the
token budget, consecutive windows sharing `overlap` tokens; a window never ends or starts inside a word, so a
part number like XR-7731 is never split across a boundary without also appearing whole in the overlap.

Chunks record character offsets into the document text, so `text == document.text[start:end]` always.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from phi3fast.rag.readers import Document

# (texts) -> for each text, the (start, end) character span of each of its tokens, without special tokens.
TokenOffsets = Callable[[list[str]], list[list[tuple[int, int]]]]


@dataclass(frozen=True)
class Chunk:
    source: str
    heading: str  # " > "-joined heading path; "" before the first heading
    start: int  # character offsets into the document text
    end: int
    text: str

    def embed_text(self) -> str:
        """What the embedder sees: the heading path as context, then the passage."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}[ \t]*$")


def _lines(text: str) -> list[tuple[int, str]]:
    out, pos = [], 0
    for line in text.splitlines(keepends=True):
        out.append((pos, line.rstrip("\r\n")))
        pos += len(line)
    return out


def sections(text: str, markup: str) -> list[tuple[str, int, int]]:
    """(heading path, body start, body end) for each section of the text, in order."""
    if markup == "plain":
        return [("", 0, len(text))]
    lines = _lines(text)
    # Each heading: (first char of its lines, first char after them, level, title).
    heads: list[tuple[int, int, int, str]] = []
    rst_levels: list[str] = []
    fence: str | None = None
    i = 0
    while i < len(lines):
        pos, line = lines[i]
        m = _FENCE.match(line)
        if m and markup == "markdown":
            marker = m.group(1)
            if fence is None:
                fence = marker[0] * 3
            elif marker.startswith(fence):
                fence = None
            i += 1
            continue
        if fence is not None:
            i += 1
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else None
        end_of = lambda k: lines[k + 1][0] if k + 1 < len(lines) else len(text)  # noqa: E731
        m = _ATX.match(line) if markup == "markdown" else None
        if m:
            heads.append((pos, end_of(i), len(m.group(1)), (m.group(2) or "").strip()))
            i += 1
            continue
        title = line.strip()
        prev_blank = i == 0 or not lines[i - 1][1].strip()
        if title and nxt is not None and prev_blank and not _UNDERLINE.match(line):
            u = _UNDERLINE.match(nxt[1])
            if u and len(nxt[1].rstrip()) >= min(len(title), 3):
                if markup == "markdown" and u.group(1) in "=-":
                    level = 1 if u.group(1) == "=" else 2
                    heads.append((pos, end_of(i + 1), level, title))
                    i += 2
                    continue
                if markup == "rst":
                    # rST has no fixed levels: each new underline character is one level deeper.
                    if u.group(1) not in rst_levels:
                        rst_levels.append(u.group(1))
                    heads.append((pos, end_of(i + 1), rst_levels.index(u.group(1)) + 1, title))
                    i += 2
                    continue
        if markup == "rst" and _UNDERLINE.match(line) and nxt is not None and i + 2 < len(lines):
            # Overlined title: ===== / Title / =====
            if _UNDERLINE.match(lines[i + 2][1]) and lines[i + 2][1][:1] == line[:1] and nxt[1].strip():
                key = line[0] * 2
                if key not in rst_levels:
                    rst_levels.append(key)
                heads.append((pos, end_of(i + 2), rst_levels.index(key) + 1, nxt[1].strip()))
                i += 3
                continue
        i += 1

    out: list[tuple[str, int, int]] = []
    stack: list[tuple[int, str]] = []
    body_start = 0
    for h_start, h_end, level, title in heads:
        out.append((" > ".join(t for _, t in stack), body_start, h_start))
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        body_start = h_end
    out.append((" > ".join(t for _, t in stack), body_start, len(text)))
    return [s for s in out if text[s[1] : s[2]].strip()]


def _windows(offsets: list[tuple[int, int]], budget: int, overlap: int) -> list[tuple[int, int]]:
    """Token index ranges [i, j) of at most `budget` tokens, sharing `overlap`, cut between words."""
    n = len(offsets)
    joined = lambda k: offsets[k][0] == offsets[k - 1][1]  # noqa: E731  token k continues token k-1's word
    out: list[tuple[int, int]] = []
    i = 0
    while i < n:
        j = min(i + budget, n)
        if j < n:
            cut = j
            while cut > i + budget // 2 and joined(cut):
                cut -= 1
            j = cut if not joined(cut) else j  # one enormous "word": cut it anyway
        out.append((i, j))
        if j >= n:
            break
        nxt = max(j - overlap, i + 1)
        while nxt < j and nxt > 0 and joined(nxt):
            nxt += 1
        i = nxt
    return out


def chunk_document(
    doc: Document, token_offsets: TokenOffsets, budget: Callable[[str], int], overlap: int
) -> list[Chunk]:
    """Chunks of one document. budget(heading) is the body token budget once the heading takes its share."""
    secs = sections(doc.text, doc.markup)
    bodies = [doc.text[s:e] for _, s, e in secs]
    chunks: list[Chunk] = []
    for (heading, s0, _), offsets in zip(secs, token_offsets(bodies), strict=True):
        if not offsets:
            continue
        if doc.title and not heading.startswith(doc.title):
            heading = f"{doc.title} > {heading}" if heading else doc.title
        for i, j in _windows(offsets, budget(heading), overlap):
            start, end = s0 + offsets[i][0], s0 + offsets[j - 1][1]
            chunks.append(Chunk(doc.source, heading, start, end, doc.text[start:end]))
    return chunks
