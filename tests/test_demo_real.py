"""`make demo` on the real model: after its QLoRA recipe, the answer to DEMO_Q is one sentence that cites a passage
inside it and names `--resume`.

Runs the Makefile's own demo target (index, both answers, the training) on the cached converted SmolLM2, so a
change to the recipe, the data or the code under it that breaks the demo's answer fails here. Slow: the demo's
whole run, 2.5 minutes on 2 cores at load 2 (README, Quickstart).
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


@pytest.fixture(scope="module")
def demo_answer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The fine-tuned answer `make demo` prints, from a full run of the target."""
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    venv = Path(sys.prefix)
    # The model and the venv exist already: -o stops make from rebuilding either.
    cmd = ["make", "demo", f"VENV={venv}", f"DEMO_OUT={out}", f"DEMO_MODEL={REAL}"]
    cmd += ["-o", str(REAL), "-o", f"{venv}/.phi3fast-demo"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    after = run.stdout.split("== The same question with the adapter")[-1]
    m = re.search(r"^A: (.*)$", after, re.M)
    assert m is not None, after
    return m.group(1)


def test_demo_answer_is_a_sentence_citing_a_passage(demo_answer: str) -> None:
    """Real English with the citation inside it ("... [2]."), not a bare "[1]" or a loop."""
    assert demo_answer.startswith("To resume an interrupted training run, "), demo_answer
    assert re.fullmatch(r"[^\[\]]+ \[[12]\]\.", demo_answer), demo_answer
    assert len(demo_answer.split()) >= 8, demo_answer


def test_demo_answer_names_resume(demo_answer: str) -> None:
    """The fact itself: the flag docs/training.md gives for resuming."""
    assert "`--resume`" in demo_answer and "`--out`" not in demo_answer, demo_answer
