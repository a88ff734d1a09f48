"""The outputs of `phi3fast eval`: report.json, report.md (tables and verdict) and report.png (grouped bars).

report.json is {"modes": {MODE: {"n", "accuracy", "token_f1", "hit_at_k", "citation_accuracy", "abstention",
"latency_p50_s", "latency_p95_s", "tokens_per_s", "by_category": {CATEGORY: {...the same figures}}}},
"verdict": {...}}; a figure that does not apply to a mode is null. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from phi3fast.eval.metrics import METRICS, mode_report
from phi3fast.eval.verdict import verdict

CHART_METRICS = ("accuracy", "token_f1", "hit_at_k", "citation_accuracy", "abstention")


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def build_report(rows: Sequence[dict[str, Any]], modes: Sequence[str]) -> dict[str, Any]:
    """report.json's content from the rows of answers.jsonl (the modes in the given order)."""
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in modes}
    reports = {m: mode_report(by_mode[m], m) for m in modes}
    correct = {m: {r["id"]: bool(r["correct"]) for r in by_mode[m]} for m in modes}
    return {"modes": reports, "verdict": verdict(reports, correct)}


def _fmt(metric: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if metric == "n":
        return str(value)
    if metric.startswith("latency"):
        return f"{value:.2f}"
    if metric == "tokens_per_s":
        return f"{value:.1f}"
    return f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def render_markdown(report: dict[str, Any]) -> str:
    modes = report["modes"]
    lines = ["# phi3fast eval", ""]
    lines += _table(["mode", *METRICS], [[m, *(_fmt(k, modes[m][k]) for k in METRICS)] for m in modes])
    v = report["verdict"]
    lines += ["", f"**Verdict.** {v['text']}", ""]
    if v["pairs"]:
        lines += ["Paired comparisons (accuracy; exact McNemar; 95% paired-bootstrap interval):", ""]
        lines += _table(
            ["a vs b", "margin", "a only", "b only", "p", "95% interval"],
            [
                [
                    f"{p['a']} vs {p['b']}",
                    f"{p['margin']:+.3f}",
                    str(p["a_only"]),
                    str(p["b_only"]),
                    f"{p['p_value']:.3g}",
                    f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]",
                ]
                for p in v["pairs"]
            ],
        )
        lines.append("")
    cats = sorted({c for m in modes for c in modes[m]["by_category"]})
    if len(cats) > 1:
        lines += ["Accuracy by category (n):", ""]
        lines += _table(
            ["mode", *cats],
            [
                [
                    m,
                    *(
                        f"{_fmt('accuracy', modes[m]['by_category'][c]['accuracy'])} ({modes[m]['by_category'][c]['n']})"
                        if c in modes[m]["by_category"]
                        else "n/a"
                        for c in cats
                    ),
                ]
                for m in modes
            ],
        )
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: one group per rate, one bar per mode (a figure that does not apply has no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(modes), 1)
    for i, m in enumerate(modes):
        xs, ys = [], []
        for j, metric in enumerate(CHART_METRICS):
            value = report["modes"][m][metric]
            if value is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(value)
        bars = ax.bar(xs, ys, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(CHART_METRICS)), [m.replace("_", " ") for m in CHART_METRICS])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("rate")
    n = max((report["modes"][m]["n"] for m in modes), default=0)
    ax.set_title(f"phi3fast eval: {n} questions per mode")
    ax.legend(ncols=len(modes), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    try:
        _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report))
    plot(report, out / "report.png")
