"""Shared by the tests of `make demo`: where the repository and the demo's training rows are, and the Makefile's
DEMO_* defaults."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "phi3fast/assets/demo_house_style.jsonl"


def make_var(name: str) -> str:
    """A `NAME ?= value` default from the Makefile."""
    m = re.search(rf"^{name} \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m is not None, f"no {name} in the Makefile"
    return m.group(1).strip()
