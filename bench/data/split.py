"""Split a corpus folder's questions.jsonl into questions.train.jsonl and questions.heldout.jsonl, deterministically.

    python bench/data/split.py bench/data/plant      # or bench/data/water

The questions are ordered by source path, then by the SHA-256 of their text, and dealt alternately to the two
halves. So every document with two or more questions has questions on both sides, the halves differ in size by
at most one, and rerunning gives the same files byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from pathlib import Path


def _h(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def main(folder: Path) -> None:
    lines = (folder / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    by_source: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        by_source[json.loads(line)["source"]].append(line)
    halves: dict[str, list[str]] = {"train": [], "heldout": []}
    ordered = [
        line
        for source in sorted(by_source)
        for line in sorted(by_source[source], key=lambda s: _h(json.loads(s)["question"]))
    ]
    for i, line in enumerate(ordered):
        halves["train" if i % 2 == 0 else "heldout"].append(line)
    for name, rows in halves.items():
        (folder / f"questions.{name}.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        print(f"questions.{name}.jsonl: {len(rows)} questions")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "questions.jsonl").is_file():
        sys.exit("usage: python bench/data/split.py FOLDER (a folder holding questions.jsonl)")
    main(Path(sys.argv[1]))
