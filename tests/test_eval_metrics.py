"""The metric rules and the verdict of `phi3fast eval` on hand-made rows, where every figure is known."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from phi3fast.eval.metrics import abstains, is_correct, mode_report, normalize, token_f1
from phi3fast.eval.verdict import compare, mcnemar_exact, verdict
from phi3fast.rag.answer import ABSTAIN_SENTENCE, SYSTEM_PROMPT


def test_accuracy_rule() -> None:
    assert normalize("  The\tBolt \n is  210   NM. ") == "the bolt is 210 nm."
    assert is_correct("Torque: 210\nNm [1]", ["210 nm"])
    assert is_correct("It is XR-7731.", ["nope", "xr-7731"])
    assert not is_correct("210Nm", ["210 Nm"])  # whitespace runs collapse; they do not vanish
    assert not is_correct("2,000 hours", ["2000 hours"])


def test_token_f1() -> None:
    assert token_f1("210 Nm", ["210 Nm"]) == 1.0
    assert token_f1("the torque is 210 Nm", ["210 Nm"]) == pytest.approx(2 * 0.4 * 1.0 / 1.4)
    assert token_f1("nothing here", ["210 Nm", "here"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("", ["x"]) == 0.0


def test_abstention_sentence_is_the_prompts() -> None:
    assert SYSTEM_PROMPT.endswith(f"reply exactly: {ABSTAIN_SENTENCE}")
    assert abstains(ABSTAIN_SENTENCE) and abstains("Sorry.  The passages do NOT contain\nthe answer")
    assert not abstains("I do not know.")


def _row(
    i: int, correct: bool, source: str | None, retrieved: list[str], cited: list[str], **kw: object
) -> dict:
    base = {"id": i, "correct": correct, "token_f1": 0.5 if correct else 0.0, "source": source,
            "retrieved": retrieved, "cited": cited, "abstained": False, "latency_s": 1.0, "new_tokens": 10}  # fmt: skip
    return {**base, **kw}


def test_mode_report_figures() -> None:
    rows = [
        _row(1, True, "a.md", ["a.md", "b.md"], ["a.md"], category="x"),
        _row(2, False, "a.md", ["b.md", "c.md"], ["b.md", "a.md"], category="x", latency_s=3.0),
        _row(3, True, "c.md", ["b.md", "c.md"], [], category="y", abstained=True, new_tokens=20),
        _row(4, False, None, ["b.md"], ["b.md"], latency_s=2.0),
    ]
    r = mode_report(rows, "rag")
    assert (r["n"], r["accuracy"], r["token_f1"]) == (4, 0.5, 0.25)
    assert r["hit_at_k"] == pytest.approx(2 / 3) and r["citation_accuracy"] == pytest.approx(1 / 3)
    assert r["abstention"] == 0.25 and r["tokens_per_s"] == pytest.approx(50 / 7)
    assert r["latency_p50_s"] == 1.5 and r["latency_p95_s"] == pytest.approx(2.85)
    assert sorted(r["by_category"]) == ["uncategorized", "x", "y"]
    assert r["by_category"]["x"]["hit_at_k"] == 0.5 and r["by_category"]["uncategorized"]["hit_at_k"] is None
    ft = mode_report(rows, "ft")
    assert ft["hit_at_k"] is None and ft["citation_accuracy"] is None and ft["abstention"] is None


@pytest.mark.parametrize(("b", "c"), [(0, 0), (0, 1), (3, 0), (5, 5), (7, 2), (1, 12), (30, 14)])
def test_mcnemar_exact_is_the_binomial_test(b: int, c: int) -> None:
    want = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(want, rel=1e-12)


def _reports(correct: dict[str, list[bool]]) -> tuple[dict, dict]:
    reports = {m: {"accuracy": sum(v) / len(v), "token_f1": 0.0} for m, v in correct.items()}
    return reports, {m: dict(enumerate(v)) for m, v in correct.items()}


def test_verdict_significant_and_cautious() -> None:
    n = 60
    big = _reports({"rag": [i < 45 for i in range(n)], "ft+rag": [i < 20 for i in range(n)]})
    v = verdict(*big)
    assert v["best"] == "rag" and v["runner_up"] == "ft+rag" and v["margin"] == pytest.approx(25 / 60)
    assert (v["best_only"], v["runner_up_only"]) == (25, 0) and v["significant"] and v["caution"] is None
    lo, hi = v["ci95"]
    assert 0 < lo < 25 / 60 < hi < 1
    close = verdict(*_reports({"rag": [i < 31 for i in range(n)], "ft+rag": [i < 30 for i in range(n)]}))
    assert not close["significant"] and "not significant" in close["caution"]
    small = verdict(*_reports({"base": [True, False, True], "ft": [True, True, True]}))
    assert small["best"] == "ft" and "only 3 questions" in small["caution"] and "Caution" in small["text"]
    tie = verdict(*_reports({"ft": [True, False], "base": [False, True]}))
    assert tie["ranking"] == ["base", "ft"]  # ties: token F1, then the order base, rag, ft, ft+rag
    one = verdict(*_reports({"rag": [True]}))
    assert one["runner_up"] is None and one["pairs"] == []
    assert compare("rag", "ft+rag", big[1])["p_value"] == pytest.approx(binomtest(25, 25, 0.5).pvalue)
