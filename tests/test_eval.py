"""`phi3fast eval` end to end on a tiny Phi-3 over tests/data/rag: every report figure is recomputed from
answers.jsonl with the rules written out here; rag replies equal `phi3fast query --json`'s; reruns are greedy and
resume; bad question files, bad modes and changed settings are one-line errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from eval_helpers import build_index, f1, labelled, make_adapter, make_tiny, norm, write_questions
from scipy.stats import binomtest

from phi3fast.cli import main
from phi3fast.rag import Index

MODES = ("base", "rag", "ft", "ft+rag")
K, MAX_NEW = 3, 8
ABSTAIN = "the passages do not contain the answer"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tiny = make_tiny(tmp_path_factory)
    root = tmp_path_factory.mktemp("eval")
    rows = labelled(6)
    rows.append(
        {"question": "Who wrote the warranty policy?", "answer": ["the vendor", "Vendor"]}
    )  # no source
    return {
        "model": tiny,
        "adapter": make_adapter(tiny, root / "adapter"),
        "index": build_index(root / "index"),
        "questions": write_questions(root / "q.jsonl", rows),
        "root": root,
    }


def _eval(s: dict[str, Path], out: Path, questions: Path | None = None, *extra: str):  # noqa: ANN202
    args = ["eval", "--model", str(s["model"]), "--adapter", str(s["adapter"]), "--index", str(s["index"])]
    args += ["--questions", str(questions or s["questions"]), "--out", str(out), "-k", str(K)]
    return CliRunner().invoke(main, [*args, "--max-new-tokens", str(MAX_NEW), *extra])


@pytest.fixture(scope="module")
def run1(setup: dict[str, Path]) -> Path:
    out = setup["root"] / "out1"
    result = _eval(setup, out)
    assert result.exit_code == 0, result.output
    assert "eval:" in result.stderr and "answer" in result.stderr  # the tqdm bar (with its ETA)
    assert "| mode | n | accuracy |" in result.stdout and "Verdict" in result.stdout
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def _cited(reply: str, retrieved: list[str], given: int) -> list[str]:
    nums: list[int] = []
    for m in re.findall(r"\[(\d+)\]", reply):
        if 1 <= int(m) <= given and int(m) not in nums:
            nums.append(int(m))
    return [retrieved[i - 1] for i in nums]


def _figures(rows: list[dict], rag: bool) -> dict:
    sourced = [r for r in rows if r["source"] is not None]
    lat = [r["latency_s"] for r in rows]
    by_source = rag and bool(sourced)  # retrieval figures need a RAG mode and rows with a source
    return {
        "n": len(rows),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "token_f1": sum(r["token_f1"] for r in rows) / len(rows),
        "hit_at_k": sum(r["source"] in r["retrieved"] for r in sourced) / len(sourced) if by_source else None,
        "citation_accuracy": (
            sum(bool(r["cited"]) and r["cited"][0] == r["source"] for r in sourced) / len(sourced)
            if by_source
            else None
        ),
        "abstention": sum(r["abstained"] for r in rows) / len(rows) if rag else None,
        "latency_p50_s": float(np.percentile(lat, 50)),
        "latency_p95_s": float(np.percentile(lat, 95)),
        "tokens_per_s": sum(r["new_tokens"] for r in rows) / sum(lat),
    }


def _check_report(out: Path, modes: tuple[str, ...], index: Index) -> dict:
    """Every figure of report.json, recomputed from answers.jsonl (and each row from its reply)."""
    report = json.loads((out / "report.json").read_text())
    rows = _rows(out)
    assert list(report["modes"]) == list(modes)
    for r in rows:
        rag = r["mode"] in ("rag", "ft+rag")
        assert r["correct"] == any(norm(a) in norm(r["reply"]) for a in r["answers"])
        assert r["token_f1"] == pytest.approx(f1(r["reply"], r["answers"]), abs=1e-12)
        assert 1 <= r["new_tokens"] <= MAX_NEW and r["latency_s"] > 0
        if rag:
            assert r["retrieved"] == [p.source for p in index.search(r["question"], k=K)]
            assert r["given"] == K  # every passage fits the tiny model's 4096 tokens
            assert r["cited"] == _cited(r["reply"], r["retrieved"], r["given"])
            assert r["abstained"] == (ABSTAIN in norm(r["reply"]))
        else:
            assert r["retrieved"] is None and r["cited"] == [] and r["abstained"] is None
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        got = report["modes"][mode]
        want = _figures(mine, mode in ("rag", "ft+rag"))
        for key, value in want.items():
            assert got[key] == (None if value is None else pytest.approx(value, abs=1e-12)), (mode, key)
        cats = {r["category"] or "uncategorized" for r in mine}
        assert set(got["by_category"]) == cats
        for c in cats:
            sub = _figures(
                [r for r in mine if (r["category"] or "uncategorized") == c], mode in ("rag", "ft+rag")
            )
            for key, value in sub.items():
                assert got["by_category"][c][key] == (
                    None if value is None else pytest.approx(value, abs=1e-12)
                )
    _check_verdict(report, rows, modes)
    return report


def _check_verdict(report: dict, rows: list[dict], modes: tuple[str, ...]) -> None:
    v = report["verdict"]
    m = report["modes"]
    ranking = sorted(modes, key=lambda x: (-m[x]["accuracy"], -m[x]["token_f1"], MODES.index(x)))
    assert v["ranking"] == ranking and v["best"] == ranking[0] and v["runner_up"] == ranking[1]
    correct = {x: {r["id"]: r["correct"] for r in rows if r["mode"] == x} for x in modes}
    pairs = [(a, b) for a in MODES for b in MODES if a in m and b in m and MODES.index(a) < MODES.index(b)]
    assert [(p["a"], p["b"]) for p in v["pairs"]] == pairs
    for p in [*v["pairs"], {"a": v["best"], "b": v["runner_up"], **_top(v)}]:
        a, b = correct[p["a"]], correct[p["b"]]
        a_only = sum(a[i] and not b[i] for i in a)
        b_only = sum(b[i] and not a[i] for i in a)
        assert (p["a_only"], p["b_only"]) == (a_only, b_only)
        assert p["margin"] == pytest.approx((sum(a.values()) - sum(b.values())) / len(a), abs=1e-12)
        want_p = 1.0 if a_only + b_only == 0 else binomtest(a_only, a_only + b_only, 0.5).pvalue
        assert p["p_value"] == pytest.approx(want_p, abs=1e-12)
        lo, hi = p["ci95"]
        assert -1 <= lo <= p["margin"] <= hi <= 1
    assert v["significant"] == (v["p_value"] < 0.05)
    assert "too few" in v["caution"] and v["caution"] in v["text"]  # 7 questions


def _top(v: dict) -> dict:
    return {"a_only": v["best_only"], "b_only": v["runner_up_only"], "margin": v["margin"],
            "p_value": v["p_value"], "ci95": v["ci95"]}  # fmt: skip


def test_every_figure_recomputed_from_answers(run1: Path, setup: dict[str, Path]) -> None:
    index = Index.open(setup["index"])
    report = _check_report(run1, MODES, index)
    assert len(_rows(run1)) == 7 * 4
    assert (
        report["modes"]["rag"]["hit_at_k"] == 1.0
    )  # the labelled questions' sources are all retrieved at k=3
    md = (run1 / "report.md").read_text()
    assert md.count("\n| ") >= 5 and report["verdict"]["text"] in md
    assert (run1 / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run1 / "run.json").read_text())["k"] == K


def test_rag_replies_are_the_query_answers(run1: Path, setup: dict[str, Path]) -> None:
    rows = {(r["id"], r["mode"]): r for r in _rows(run1)}
    q = json.loads(setup["questions"].read_text().splitlines()[0])["question"]
    base = [
        "query",
        q,
        "--index",
        str(setup["index"]),
        "-k",
        str(K),
        "--model",
        str(setup["model"]),
        "--json",
    ]
    for mode, extra in (("rag", []), ("ft+rag", ["--adapter", str(setup["adapter"])])):
        result = CliRunner().invoke(main, [*base, *extra, "--max-new-tokens", str(MAX_NEW)])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["answer"] == rows[(1, mode)]["reply"]
    assert rows[(1, "base")]["reply"] != rows[(1, "ft")]["reply"]  # the adapter was applied for ft


def test_new_tokens_counted_exactly(run1: Path, setup: dict[str, Path]) -> None:
    from phi3fast.generate import chat_prompt_ids, generate_tokens, stop_ids
    from phi3fast.model import load

    model = load(setup["model"])
    for r in [r for r in _rows(run1) if r["mode"] == "base"][:3]:
        ids = chat_prompt_ids(model, [{"role": "user", "content": r["question"]}])
        tokens = list(generate_tokens(model, ids, max_new_tokens=MAX_NEW, stop=stop_ids(model)))
        assert r["new_tokens"] == len(tokens)
        assert r["reply"] == model.tokenizer.decode(tokens, skip_special_tokens=True)


def test_accuracy_rule_and_greedy_rerun(run1: Path, setup: dict[str, Path]) -> None:
    """Answers cut from run 1's replies (case and whitespace changed) must count as correct in a rerun."""
    first = {r["id"]: r for r in _rows(run1) if r["mode"] == "base"}
    rows = [json.loads(line) for line in setup["questions"].read_text().splitlines()]
    expect = 0
    for i, row in enumerate(rows, 1):
        m = re.search(r"[A-Za-z]{2,} [A-Za-z]{2,}", first[i]["reply"]) or re.search(
            r"[A-Za-z]{2,}", first[i]["reply"]
        )
        if m and i % 2:
            row["answer"] = [" " + m.group(0).upper().replace(" ", " \n\t ") + "  ", "no such answer"]
            expect += 1
    assert expect >= 2, [r["reply"] for r in first.values()]  # the tiny model's text has words to cut
    q2 = write_questions(setup["root"] / "q2.jsonl", rows)
    out = setup["root"] / "out2"
    result = _eval(setup, out, q2, "--modes", "base,ft", "--no-progress")
    assert result.exit_code == 0, result.output
    second = {r["id"]: r for r in _rows(out) if r["mode"] == "base"}
    assert [second[i]["reply"] for i in first] == [first[i]["reply"] for i in first]  # greedy: same replies
    report = _check_report(out, ("base", "ft"), Index.open(setup["index"]))
    assert report["modes"]["base"]["accuracy"] == pytest.approx(expect / len(rows))


def test_resume_answers_only_the_missing_rows(
    run1: Path, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import phi3fast.eval.runner as runner

    out = setup["root"] / "out3"
    shutil.copytree(run1, out)
    lines = (out / "answers.jsonl").read_text().splitlines(keepends=True)
    (out / "answers.jsonl").write_text("".join(lines[:5]) + lines[5][:30])  # interrupted mid-row
    calls = []
    real = runner._answer
    monkeypatch.setattr(runner, "_answer", lambda *a: calls.append(a[2:4]) or real(*a))
    result = _eval(setup, out, None, "--modes", "base,ft", "--no-progress")
    assert result.exit_code == 0, result.output
    assert [(m, q.line) for m, q in calls] == [("base", 6), ("base", 7)] + [("ft", i) for i in range(1, 8)]
    old = {(r["id"], r["mode"]): r["reply"] for r in _rows(run1)}
    new = {(r["id"], r["mode"]): r["reply"] for r in _rows(out)}
    assert len(new) == len(_rows(out)) == 5 + 2 + 7 and all(new[key] == old[key] for key in new)
    report, before = (
        json.loads((out / "report.json").read_text()),
        json.loads((run1 / "report.json").read_text()),
    )
    for mode in ("base", "ft"):
        for key in ("n", "accuracy", "token_f1"):
            assert report["modes"][mode][key] == before["modes"][mode][key]
    result = _eval(setup, out, None, "--modes", "base")
    assert result.exit_code == 0 and "eval:" not in result.stderr  # nothing left to answer
    result = CliRunner().invoke(main, ["eval", "--model", str(setup["model"]), "--questions",
                                       str(setup["questions"]), "--out", str(out), "--modes", "base", "-k", "2"])  # fmt: skip
    assert (
        result.exit_code == 2 and "other settings (adapter, index, k, max_new_tokens differ)" in result.stderr
    )


BAD_ROWS = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "a row must be a JSON object"),
    ('{"answer": "x"}', "'question' must be a non-empty string"),
    ('{"question": "  ", "answer": "x"}', "'question' must be a non-empty string"),
    ('{"question": "q"}', "'answer' is missing"),
    ('{"question": "q", "answer": []}', "'answer' must be a string or a non-empty list"),
    ('{"question": "q", "answer": 42}', "'answer' must be a string or a non-empty list"),
    ('{"question": "q", "answer": ["ok", ""]}', "every acceptable answer must be a non-empty string"),
    ('{"question": "q", "answer": "x", "source": 3}', "'source' must be a non-empty string"),
    ('{"question": "q", "answer": "x", "category": ""}', "'category' must be a non-empty string"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_ROWS)
def test_bad_question_row_is_file_line_before_any_model(tmp_path: Path, line: str, reason: str) -> None:
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "fine", "answer": "yes"}\n\n' + line + "\n")
    args = [
        "eval",
        "--model",
        str(tmp_path / "no-model"),
        "--questions",
        str(q),
        "--out",
        str(tmp_path / "o"),
    ]
    result = CliRunner().invoke(main, [*args, "--modes", "base"])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {q}:3: {reason}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_empty_or_missing_question_file(tmp_path: Path) -> None:
    q = tmp_path / "q.jsonl"
    q.write_text("\n \n")
    for path, reason in ((q, "no questions in it"), (tmp_path / "none.jsonl", "no such file")):
        args = [
            "eval",
            "--model",
            "m",
            "--questions",
            str(path),
            "--out",
            str(tmp_path / "o"),
            "--modes",
            "base",
        ]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and result.stderr == f"error: {path}: {reason}\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--modes: rag needs --index"),
        (["--index", "i"], "--modes: ft needs --adapter"),
        (["--modes", "ft+rag"], "--modes: ft+rag needs --adapter and --index"),
        (["--modes", "base,bogus"], "--modes: unknown mode 'bogus'; choose among base, rag, ft, ft+rag"),
        (["--modes", "base,base"], "--modes: a mode is repeated"),
        (["--modes", " , "], "--modes: none given"),
    ],
)
def test_mode_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    q = write_questions(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}])
    args = ["eval", "--model", "m", "--questions", str(q), "--out", str(tmp_path / "o"), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {message}")


def test_dequantize_keeps_the_model(setup: dict[str, Path]) -> None:
    """--dequantize decodes with the weights NF4 holds, stored dense: the same logits, adapter included."""
    import torch

    from phi3fast.eval.runner import dequantize_base
    from phi3fast.lora import load_adapter
    from phi3fast.model import load

    model = load(setup["model"])
    load_adapter(model, setup["adapter"])
    ids = torch.tensor([[5, 77, 300, 12, 9, 401, 33]])
    with torch.no_grad():
        before = model(ids)
        dequantize_base(model)
        after = model(ids)
    assert all(lin.nf4 is None and lin.weight is not None for lin in model.linears().values())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
