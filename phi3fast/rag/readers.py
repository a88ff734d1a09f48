"""Turn files into plain-text documents: decoding, HTML and PDF text extraction, JSONL records.

Every reader returns `Document`s whose `text` is what chunk offsets point into: for .md/.txt/.rst that is the
decoded file; for .html the extracted text (headings rewritten as markdown `#` lines so they become each
chunk's context); for .pdf the text layer, pages separated by a blank line; for .jsonl each record's "text".

A file that cannot be used (empty, binary, undecodable, a PDF without a text layer) is skipped with one warning
line, so one bad file never stops a run over a whole document tree. A malformed JSONL line is an error naming
the file and line: the user wrote that record on purpose, dropping it silently would hide a bug.
"""

from __future__ import annotations

import codecs
import html.parser
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phi3fast.errors import Phi3FastError

_TITLE_MAX = 100  # characters: a longer first line is a paragraph, not a title
SUPPORTED_SUFFIXES = (".md", ".markdown", ".txt", ".rst", ".html", ".htm", ".pdf", ".jsonl")


@dataclass(frozen=True)
class Document:
    source: str  # the path relative to the root given (+ "#id" for a JSONL record), shown in results
    text: str
    markup: str  # "markdown" | "rst" | "plain": how headings are found
    title: str = ""  # a plain-text file's title line: the context of every chunk (chunking.chunk_document)


class SkipFile(Exception):
    """This file holds nothing to index; the message says why (printed as one warning line)."""


# BOMs, longest first (the UTF-32 LE BOM starts with the UTF-16 LE one).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# C0 controls other than tab, newline, form feed and carriage return: rare in text, common in binary.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def decode_text(data: bytes) -> str:
    """Decode bytes of unknown encoding: BOM, then UTF-8, then BOM-less UTF-16, then Latin-1 if it looks like text.

    Raises SkipFile for empty or binary data.
    """
    if not data.strip():
        raise SkipFile("empty file")
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom) :].decode(enc)
            except UnicodeDecodeError as e:
                raise SkipFile(f"undecodable {enc} after its byte-order mark ({e.reason})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None and b"\x00" in data[:4096]:
        # UTF-16 without a BOM: ASCII-range text puts a zero in every other byte.
        head = data[:4096]
        even, odd = head[0::2].count(0), head[1::2].count(0)
        enc = (
            "utf-16-le" if odd > 0.3 * len(head) / 2 else "utf-16-be" if even > 0.3 * len(head) / 2 else None
        )
        if enc is not None and len(data) % 2 == 0:
            try:
                text = data.decode(enc)
            except UnicodeDecodeError:
                text = None
    if text is None:
        if b"\x00" in data:
            raise SkipFile("binary file (NUL bytes)")
        # Latin-1 decodes any byte string, so accept it only when the result reads as text. Windows-1252 first:
        # it agrees with Latin-1 on every printable character and also maps the 0x80-0x9f "smart quotes".
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
    if len(_CONTROL.findall(text[:65536])) > 0.01 * min(len(text), 65536):
        raise SkipFile("binary file (control characters)")
    if not text.strip():
        raise SkipFile("empty file")
    return text


class _HtmlText(html.parser.HTMLParser):
    """Collect visible text; h1-h6 become markdown headings, block elements become line breaks."""

    _BLOCK = {"p", "div", "br", "li", "tr", "table", "ul", "ol", "section", "article", "pre", "blockquote"}
    _HIDDEN = {"script", "style", "head", "template", "noscript"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n")
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data if "\n" not in data else re.sub(r"[ \t]*\n[ \t]*", "\n", data))


def html_to_text(markup: str) -> str:
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def pdf_text(path: Path) -> str:
    import pypdf

    try:
        reader = pypdf.PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises many types on damaged files; any of them means "skip this file"
        raise SkipFile(f"unreadable PDF ({type(e).__name__}: {e})") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise SkipFile("PDF has no text layer (scanned images need OCR first)")
    return text + "\n"


def jsonl_documents(path: Path, source: str) -> Iterator[Document]:
    text = decode_text(path.read_bytes())
    found = False
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise Phi3FastError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise Phi3FastError(f"{path}:{lineno}: expected an object with a string 'text'")
        for key in ("id", "source"):
            if key in row and not isinstance(row[key], str | int):
                raise Phi3FastError(f"{path}:{lineno}: '{key}' must be a string or an integer")
        if not row["text"].strip():
            continue
        found = True
        name = str(row["source"]) if "source" in row else f"{source}#{row.get('id', lineno)}"
        yield Document(source=name, text=row["text"], markup="markdown")
    if not found:
        raise SkipFile("no records with text")


def read_documents(path: Path, source: str) -> list[Document]:
    """All documents in one file. Raises SkipFile (warn and go on) or Phi3FastError (stop)."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return [Document(source, pdf_text(path), "plain")]
    if suffix == ".jsonl":
        return list(jsonl_documents(path, source))
    text = decode_text(path.read_bytes())
    if suffix in (".html", ".htm"):
        text = html_to_text(text)
        if not text.strip():
            raise SkipFile("HTML has no visible text")
        return [Document(source, text, "markdown")]
    markup = {".md": "markdown", ".markdown": "markdown", ".rst": "rst"}.get(suffix, "plain")
    return [Document(source, text, markup, plain_title(text) if markup == "plain" else "")]


def plain_title(text: str) -> str:
    """The first line of a plain-text file when it reads as a title: short, not a sentence, with text after it.

    Markdown, rST and HTML name their sections; a .txt manual only says what it is on its first line, and without
    it a chunk from its middle ("F07 Earth fault...") cannot tell which of two similar manuals it belongs to.
    """
    first, _, rest = text.strip().partition("\n")
    first = first.strip()
    if not first or not rest.strip() or len(first) > _TITLE_MAX or first[-1] in ".,;:?!":
        return ""
    return first


def iter_files(roots: list[Path]) -> Iterator[tuple[Path, str]]:
    """(path, source) for each indexable file under the roots; source is relative to the root it was found in.

    A directory root is walked (hidden files and folders skipped; unsupported suffixes ignored); a file root is
    taken whatever its suffix (read as text) and its source is its name.
    """
    seen: dict[str, Path] = {}
    for root in roots:
        if not root.exists():
            raise Phi3FastError(f"{root}: no such file or directory")
        if root.is_file():
            found = [(root, root.name)]
        else:
            found = []
            for p in sorted(root.rglob("*")):
                rel = p.relative_to(root)
                if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                    continue
                if p.suffix.lower() in SUPPORTED_SUFFIXES:
                    found.append((p, rel.as_posix()))
        for p, source in found:
            if source in seen and seen[source].resolve() != p.resolve():
                raise Phi3FastError(
                    f"two files have the same source path '{source}': {seen[source]} and {p} "
                    "(index them into separate indexes, or pass their common parent folder)"
                )
            if source not in seen:
                seen[source] = p
                yield p, source
