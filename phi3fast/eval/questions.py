"""The question file of `phi3fast eval` and `phi3fast rag-data`: one JSON object per line.

    {"question": str, "answer": str | [str, ...], "source": str (optional), "category": str (optional)}

`answer` holds the acceptable answers; `source` is the document that holds the answer, named as `phi3fast query`
names it (its path relative to the indexed folder). Other keys are allowed and ignored, so a question set can
carry its own notes. Every row is checked before any model loads; a bad one is `FILE:LINE: reason`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3fast.errors import Phi3FastError


@dataclass(frozen=True)
class Question:
    line: int  # 1-based line in the file: the row's id in answers.jsonl
    question: str
    answers: tuple[str, ...]
    source: str | None = None
    category: str | None = None


def _optional_str(obj: dict, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise Phi3FastError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value.strip()


def parse_question(obj: Any, where: str, line: int) -> Question:
    if not isinstance(obj, dict):
        raise Phi3FastError(f"{where}: a row must be a JSON object, got {type(obj).__name__}")
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        raise Phi3FastError(f"{where}: 'question' must be a non-empty string, got {q!r}")
    if "answer" not in obj:
        raise Phi3FastError(f"{where}: 'answer' is missing (a string or a list of acceptable answers)")
    raw = obj["answer"]
    answers = [raw] if isinstance(raw, str) else raw
    if not isinstance(answers, list) or not answers:
        raise Phi3FastError(f"{where}: 'answer' must be a string or a non-empty list of strings, got {raw!r}")
    for a in answers:
        # An empty answer would be a substring of every reply: every question would count as answered.
        if not isinstance(a, str) or not a.strip():
            raise Phi3FastError(f"{where}: every acceptable answer must be a non-empty string, got {a!r}")
    return Question(
        line=line,
        question=q.strip(),
        answers=tuple(a.strip() for a in answers),
        source=_optional_str(obj, "source", where),
        category=_optional_str(obj, "category", where),
    )


def load_questions(path: str | Path, need_source: bool = False) -> list[Question]:
    """Every row of a question file, validated; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Phi3FastError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Phi3FastError(f"{path}: cannot read it ({e})") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise Phi3FastError(f"{where}: not valid JSON ({e.msg})") from None
        q = parse_question(obj, where, lineno)
        if need_source and q.source is None:
            raise Phi3FastError(f"{where}: 'source' is needed (the document that holds the answer)")
        out.append(q)
    if not out:
        raise Phi3FastError(f"{path}: no questions in it")
    return out


def file_digest(path: str | Path) -> str:
    """sha256 of a file: ties a resumed run to the question file it started with."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
