"""Which mode answers best, and can the question set tell: paired comparisons of correctness.

Every mode answers the same questions, so modes are compared question by question. The exact McNemar test looks
only at the discordant questions (one mode right, the other wrong): under "no difference" each is a fair coin,
so p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)]). A paired bootstrap (resampling questions, a fixed seed)
gives a 95% interval for the accuracy difference. A verdict carries a caution when the set is too small
(fewer than MIN_QUESTIONS) or the difference is not significant at ALPHA.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from phi3fast.eval.metrics import MODES

ALPHA = 0.05
MIN_QUESTIONS = 30  # below this, even a 20-point margin is rarely significant with McNemar
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def bootstrap_interval(a: Sequence[bool], b: Sequence[bool]) -> tuple[float, float]:
    """95% paired-bootstrap interval of mean(a) - mean(b) (a[i], b[i]: the same question)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = d[rng.integers(0, len(d), size=(BOOTSTRAP_SAMPLES, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def compare(a: str, b: str, correct: Mapping[str, Mapping[int, bool]]) -> dict[str, Any]:
    """Mode a against mode b on the questions both answered; correct[mode][question id] -> bool."""
    ids = sorted(set(correct[a]) & set(correct[b]))
    xa = [correct[a][i] for i in ids]
    xb = [correct[b][i] for i in ids]
    a_only = sum(x and not y for x, y in zip(xa, xb, strict=True))
    b_only = sum(y and not x for x, y in zip(xa, xb, strict=True))
    lo, hi = bootstrap_interval(xa, xb) if ids else (0.0, 0.0)
    return {
        "a": a,
        "b": b,
        "n": len(ids),
        "margin": (sum(xa) - sum(xb)) / len(ids) if ids else 0.0,
        "a_only": a_only,
        "b_only": b_only,
        "p_value": mcnemar_exact(a_only, b_only),
        "ci95": [lo, hi],
    }


def _rank_key(mode: str, reports: Mapping[str, Mapping[str, Any]]) -> tuple:
    r = reports[mode]
    return (-(r["accuracy"] or 0.0), -(r["token_f1"] or 0.0), MODES.index(mode))


def verdict(
    reports: Mapping[str, Mapping[str, Any]], correct: Mapping[str, Mapping[int, bool]]
) -> dict[str, Any]:
    """The best mode by accuracy (ties: token F1, then the order base, rag, ft, ft+rag), its margin over the
    runner-up with the paired test, every pair of modes, a caution when the set cannot tell, and a text."""
    ranked = sorted(reports, key=lambda m: _rank_key(m, reports))
    best = ranked[0]
    pairs = [compare(a, b, correct) for a, b in itertools.combinations([m for m in MODES if m in reports], 2)]
    out: dict[str, Any] = {"metric": "accuracy", "best": best, "ranking": ranked, "runner_up": None}
    acc = reports[best]["accuracy"] or 0.0
    text = f"best: {best} (accuracy {acc:.3f})"
    caution = None
    if len(ranked) > 1:
        top = compare(best, ranked[1], correct)
        out.update(
            runner_up=ranked[1],
            margin=top["margin"],
            best_only=top["a_only"],
            runner_up_only=top["b_only"],
            p_value=top["p_value"],
            ci95=top["ci95"],
            significant=top["p_value"] < ALPHA,
        )
        text += (
            f", {top['margin']:+.3f} over {ranked[1]} ({reports[ranked[1]]['accuracy'] or 0.0:.3f}); "
            f"exact McNemar p = {top['p_value']:.3g} ({top['a_only']} vs {top['b_only']} discordant questions); "
            f"95% paired-bootstrap interval of the difference [{top['ci95'][0]:+.3f}, {top['ci95'][1]:+.3f}]"
        )
        n = top["n"]
        if n < MIN_QUESTIONS:
            caution = f"only {n} questions: too few to tell the modes apart; use at least {MIN_QUESTIONS}"
        elif not out["significant"]:
            caution = f"the difference is not significant at {ALPHA} (p = {top['p_value']:.3g}): more questions are needed to tell"
    out["pairs"] = pairs
    out["caution"] = caution
    out["text"] = text + (f". Caution: {caution}." if caution else ".")
    return out
