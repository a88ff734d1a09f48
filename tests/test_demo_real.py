"""`make demo` on the real model: after its QLoRA recipe, the answer to DEMO_Q is a sentence that names `--resume`
and cites a passage inside it.

Runs the Makefile's own demo target (index, both answers, the training) on the cached converted SmolLM2, so a
change to the recipe, the data or the code under it that breaks the demo's answer fails here. Slow (minutes).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from demo_helpers import DATA, ROOT
from test_interop_real import REAL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        REAL is None, reason="no converted SmolLM2 (run `make demo` or set PHI3FAST_REAL_MODEL)"
    ),
    pytest.mark.skipif(shutil.which("make") is None, reason="no `make` on PATH"),
]


def test_rows_fit_the_demo_seq_len() -> None:
    """No training row is cut: every one fits the demo's --seq-len 320 with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REAL))
    for line in DATA.read_text(encoding="utf-8").splitlines():
        ids = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True)
        assert len(ids["input_ids"]) <= 320


def test_make_demo_answers_with_an_inline_citation(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    venv = Path(sys.prefix)
    # The model and the venv exist already: -o stops make from rebuilding either.
    cmd = ["make", "demo", f"VENV={venv}", f"DEMO_OUT={out}", f"DEMO_MODEL={REAL}"]
    cmd += ["-o", str(REAL), "-o", f"{venv}/.phi3fast-demo"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    after = run.stdout.split("== The same question with the adapter")[-1]
    answer = re.search(r"^A: (.*)$", after, re.M).group(1)
    # A sentence that names the flag and carries its citation before it ends, not a bare "[1]".
    assert "--resume" in answer, answer
    assert re.search(r"[a-z`]\S* \[[12]\]\.", answer), answer
    assert len(answer.split()) >= 8, answer
