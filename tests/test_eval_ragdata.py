"""`phi3fast rag-data`: chat rows whose prompt is exactly `phi3fast query --model`'s over the real top k, whose
target cites the gold passage's number, and a seeded share of rows with the gold removed and the abstention
sentence as the target; the rows train."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from eval_helpers import QUESTIONS, CachedIndex, build_index, make_tiny, norm, write_questions

from phi3fast.cli import main
from phi3fast.rag.answer import ABSTAIN_SENTENCE, SYSTEM_PROMPT, build_messages

K = 3


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ragdata")
    index = build_index(root / "index")
    rows = [{"question": q["question"], "answer": q["expect"], "source": q["source"]} for q in QUESTIONS]
    questions = write_questions(root / "train.jsonl", rows)
    out = root / "rows.jsonl"
    result = CliRunner().invoke(
        main,
        ["rag-data", "--index", str(index), "--questions", str(questions), "--out", str(out), "-k", str(K),
         "--target", "answer"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    made = [json.loads(line) for line in out.read_text().splitlines()]
    return {"root": root, "index": index, "cached": CachedIndex(index), "questions": questions, "out": out, "in": rows, "rows": made,
            "stdout": result.stdout}  # fmt: skip


def _gold(passages: list, q: dict) -> int | None:
    mine = [i for i, p in enumerate(passages) if p.source == q["source"]]
    holding = [i for i in mine if norm(q["answer"]) in norm(passages[i].text)]
    return (holding or mine or [None])[0]


def test_rows_cite_the_gold_or_abstain(made: dict) -> None:
    index = made["cached"]
    removed = missed = cited = 0
    assert len(made["rows"]) == len(made["in"])
    for q, row in zip(made["in"], made["rows"], strict=True):
        system, user, assistant = row["messages"]
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        assert system["content"] == SYSTEM_PROMPT
        top = index.search(q["question"], k=K)
        gold = _gold(top, q)
        if assistant["content"] != ABSTAIN_SENTENCE:
            cited += 1
            assert user["content"] == build_messages(q["question"], top)[1]["content"]
            assert assistant["content"] == f"{q['answer'].rstrip('.')} [{gold + 1}]."
            n = int(re.search(r"\[(\d+)\]\.$", assistant["content"]).group(1))
            header = re.search(rf"^\[{n}\] \((.+?)[ )]", user["content"], re.M).group(1)
            assert header == q["source"]  # the cited number is a passage from the gold source
        elif gold is None:
            missed += 1
            assert user["content"] == build_messages(q["question"], top)[1]["content"]
        else:
            removed += 1
            pool = [
                p for p in index.search(q["question"], k=60)
                if p.source != q["source"] and norm(q["answer"]) not in norm(p.text)
            ]  # fmt: skip
            assert user["content"] == build_messages(q["question"], pool[:K])[1]["content"]
            passages = user["content"].rsplit("\n\nQuestion: ", 1)[0]
            assert f"({q['source']}" not in passages and norm(q["answer"]) not in norm(passages)
    assert removed == round(0.2 * len(made["in"])) and cited > removed
    assert (
        f"{len(made['rows'])} rows ({cited} cite the gold passage, {removed} with the gold passage removed, "
    )
    assert f"{missed} whose source was not in the top {K}" in made["stdout"]


def test_rows_are_seeded_and_fraction_is_honoured(made: dict) -> None:
    from phi3fast.eval.questions import load_questions
    from phi3fast.eval.ragdata import rag_rows

    questions = load_questions(made["questions"], need_source=True)
    again, stats = rag_rows(made["cached"], questions, k=K, target_kind="answer")
    assert again == made["rows"] and stats.rows == len(again)  # the same seeded choice as the CLI run
    none, stats0 = rag_rows(made["cached"], questions, k=K, no_gold_fraction=0.0, target_kind="answer")
    assert stats0.removed == 0 and stats.removed == round(0.2 * len(questions))
    changed = [i for i, (a, b) in enumerate(zip(none, again, strict=True)) if a != b]
    assert len(changed) == stats.removed
    assert all(again[i]["messages"][2]["content"] == ABSTAIN_SENTENCE for i in changed)
    other, _ = rag_rows(made["cached"], questions, k=K, seed=1, target_kind="answer")
    assert other != again  # the seed picks which rows lose their gold passage


def test_prompt_is_the_query_paths(made: dict, tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:  # noqa: ANN001
    """What `phi3fast query --model` hands to the model, captured, equals the rows' system and user turns."""
    import phi3fast.generate as generate

    sent: list = []
    monkeypatch.setattr(
        generate, "stream_chat", lambda model, messages, **kw: sent.append(messages) or iter(["x"])
    )
    tiny = make_tiny(tmp_path_factory)
    cited = [
        (q, r)
        for q, r in zip(made["in"], made["rows"], strict=True)
        if r["messages"][2]["content"] != ABSTAIN_SENTENCE
    ]
    for q, row in cited[:2]:
        args = [
            "query",
            q["question"],
            "--index",
            str(made["index"]),
            "-k",
            str(K),
            "--model",
            str(tiny),
            "--json",
        ]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert sent[-1] == row["messages"][:2]
    assert len(sent) == 2


def test_rows_train(made: dict) -> None:
    from phi3fast.model.tiny import init_tiny

    tiny = init_tiny(made["root"] / "tiny", hidden=64, layers=1, heads=4, intermediate=128, vocab=512)
    out = made["root"] / "adapter"
    args = ["train", "--model", str(tiny), "--data", str(made["out"]), "--out", str(out), "--max-steps", "2"]
    result = CliRunner().invoke(
        main, [*args, "--batch-size", "2", "--seq-len", "1024", "--save-every", "1", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file()
    # bench/eval_real_ckpt.py: a checkpoint as an adapter folder that loads with the checkpoint's tensors.
    import subprocess
    import sys

    from safetensors.torch import load_file

    from phi3fast.lora import load_adapter, lora_state_dict, read_adapter_config
    from phi3fast.model import load

    conv = made["root"] / "from_ckpt"
    script = Path(__file__).resolve().parents[1] / "bench" / "eval_real_ckpt.py"
    ckpt = out / "checkpoints" / "step-1"
    cmd = [sys.executable, str(script), str(ckpt), str(conv), "--rank", "16", "--alpha", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert read_adapter_config(conv) == read_adapter_config(out)
    model = load(tiny)
    load_adapter(model, conv)
    want, got = load_file(str(ckpt / "lora.safetensors")), lora_state_dict(model)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k].float()) for k in want)
    final = load_file(str(out / "adapter_model.safetensors"))
    assert any(not torch.equal(want[k], final[k]) for k in want)  # step 1 is not the end of training


def test_rag_data_errors(made: dict, tmp_path: Path) -> None:
    q = write_questions(
        tmp_path / "q.jsonl",
        [{"question": "a?", "answer": "b", "source": "x.md"}, {"question": "c?", "answer": "d"}],
    )
    base = ["rag-data", "--index", str(made["index"]), "--questions"]
    result = CliRunner().invoke(main, [*base, str(q), "--out", str(tmp_path / "o.jsonl")])
    assert (
        result.exit_code == 2
        and result.stderr == f"error: {q}:2: 'source' is needed (the document that holds the answer)\n"
    )
    result = CliRunner().invoke(main, [*base, str(made["questions"]), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.stderr
    result = CliRunner().invoke(
        main, [*base, str(made["questions"]), "--out", str(tmp_path / "no" / "o.jsonl")]
    )
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_sentences_split_as_written() -> None:
    from phi3fast.eval.ragdata import answer_sentence, sentences

    text = (
        "The pump runs at 2900 rpm. Its seal\nis a cartridge type (SC-40).\n\n"
        "- Torque the flange to 45 Nm.\n- Check 3.5 bar at the outlet!\n"
        "| F07 | earth fault |\n**Who signs?** The shift manager."
    )
    assert sentences(text) == [
        "The pump runs at 2900 rpm.",
        "Its seal is a cartridge type (SC-40).",
        "- Torque the flange to 45 Nm.",
        "- Check 3.5 bar at the outlet!",
        "| F07 | earth fault |",
        "**Who signs?**",
        "The shift manager.",
    ]
    assert answer_sentence(text, ["sc-40"]) == "Its seal is a cartridge type (SC-40)."
    assert answer_sentence(text, ["3.5  BAR", "nothing"]) == "- Check 3.5 bar at the outlet!"
    assert answer_sentence(text, ["rpm. Its"]) is None  # an answer across a sentence border: no sentence


def test_sentence_targets_and_rotated_rows(made: dict) -> None:
    """rows_per_question=3: row v shows the passages rotated by v, the target copies the gold passage's sentence
    that holds the answer and cites the gold passage's new number; the abstention share counts rows."""
    from phi3fast.eval.questions import load_questions
    from phi3fast.eval.ragdata import rag_rows

    index = made["cached"]
    questions = load_questions(made["questions"], need_source=True)
    rows, stats = rag_rows(index, questions, k=K, rows_per_question=3, target_kind="sentence")
    assert len(rows) == stats.rows == 3 * len(questions)
    assert stats.removed == round(0.2 * len(rows)) and stats.cited + stats.removed + stats.missed == len(rows)
    numbers, sentence_rows = [], 0
    for i, q in enumerate(made["in"]):
        top = index.search(q["question"], k=K)
        for v in range(3):
            _, user, assistant = rows[3 * i + v]["messages"]
            reply = assistant["content"]
            if reply == ABSTAIN_SENTENCE:
                continue
            shown = top[-v:] + top[:-v] if v else top  # rotated by v: the last v passages come first
            assert user["content"] == build_messages(q["question"], shown)[1]["content"]
            n = int(re.search(r" \[(\d+)\]\.$", reply).group(1))
            numbers.append(n)
            gold = shown[n - 1]
            assert gold.source == q["source"] and top.index(gold) == _gold(top, q)
            said = reply[: -len(f" [{n}].")]
            assert norm(q["answer"]) in norm(said)
            if norm(said) in norm(gold.text) and said != q["answer"].rstrip("."):
                sentence_rows += 1  # copied from the passage, longer than the bare answer
    assert sentence_rows == stats.sentences > 0
    assert len(set(numbers)) > 1  # the rotations move the gold passage
    out = made["root"] / "rows3.jsonl"
    args = [
        "rag-data",
        "--index",
        str(made["index"]),
        "--questions",
        str(made["questions"]),
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, [*args, "-k", str(K), "--rows-per-question", "3"])  # target: sentence
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert f"{stats.sentences} of the {stats.cited} citing targets copy a sentence" in result.stdout
    result = CliRunner().invoke(main, [*args, "--rows-per-question", "0"])
    assert result.exit_code == 2 and "--rows-per-question" in result.stderr
