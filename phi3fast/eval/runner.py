"""`phi3fast eval`: the same questions answered four ways, one row per question and mode in answers.jsonl.

Modes
-----
- base: the model alone; the question is the one user turn (what `phi3fast generate "QUESTION"` sends).
- ft: the same, with the adapter.
- rag: the question over the index with `phi3fast query --model`'s own path: hybrid search for the top k, then
  the steps of phi3fast.rag.answer.stream_answer (fit_passages, build_messages, greedy decoding), run here so
  the generated tokens can be counted; tests check the reply equals `phi3fast query --json`'s answer.
- ft+rag: rag with the adapter.

The base model is loaded (and quantized) once: the modes without the adapter run first, then the adapter is
applied to the same model for the others. Decoding is greedy, so a rerun gives the same replies.

Resuming: each row is appended to answers.jsonl (and flushed) as soon as it is answered; a rerun with the same
settings (run.json) skips the rows already there, and a row cut short by an interruption is dropped and redone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3fast.errors import Phi3FastError
from phi3fast.eval.metrics import MODES, RAG_MODES, abstains, is_correct, token_f1
from phi3fast.eval.questions import Question, file_digest, load_questions
from phi3fast.eval.report import atomic_write_text, build_report, write_report
from phi3fast.rag.answer import AnswerConfig

ANSWERS = "answers.jsonl"
RUN = "run.json"


@dataclass(frozen=True)
class EvalConfig:
    model: str
    questions: Path
    out: Path
    adapter: str | None = None
    index: Path | None = None
    modes: tuple[str, ...] = MODES
    k: int = 5
    max_new_tokens: int = 256
    dequantize: bool = False  # decode with the NF4 base's dequantized weights (see dequantize_base)
    progress: bool = True


def parse_modes(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'base,rag' -> ('base', 'rag'); unknown or repeated modes are errors."""
    items = [m.strip() for m in spec.split(",")] if isinstance(spec, str) else [m.strip() for m in spec]
    items = [m for m in items if m]
    if not items:
        raise Phi3FastError(f"modes: none given; choose among {', '.join(MODES)}")
    for m in items:
        if m not in MODES:
            raise Phi3FastError(f"modes: unknown mode {m!r}; choose among {', '.join(MODES)}")
    if len(set(items)) != len(items):
        raise Phi3FastError(f"modes: a mode is repeated in {','.join(items)}")
    return tuple(items)


def lacking(modes: Sequence[str], adapter: str | None, index: Path | None) -> tuple[str, list[str]] | None:
    """The first mode that lacks what it needs ('adapter' for ft and ft+rag, 'index' for rag and ft+rag), or None."""
    for m in modes:
        what = [w for w, missing in (("adapter", m.startswith("ft") and adapter is None),
                                     ("index", m in RAG_MODES and index is None)) if missing]  # fmt: skip
        if what:
            return m, what
    return None


def check_modes(modes: Sequence[str], adapter: str | None, index: Path | None) -> None:
    gap = lacking(modes, adapter, index)
    if gap is not None:
        m, what = gap
        needs = " and ".join(f"an {w}" for w in what)
        raise Phi3FastError(
            f"mode {m!r} needs {needs}; give {'them' if len(what) > 1 else 'it'} or leave {m!r} out of the modes"
        )


def _settings(cfg: EvalConfig) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "adapter": cfg.adapter,
        "index": None if cfg.index is None else str(cfg.index),
        "questions": str(cfg.questions),
        "questions_sha256": file_digest(cfg.questions),
        "k": cfg.k,
        "max_new_tokens": cfg.max_new_tokens,
        "dequantize": cfg.dequantize,
    }


def _check_run(out: Path, settings: dict[str, Any]) -> None:
    """A directory holds one run: resuming it with other settings would mix incomparable rows."""
    run = out / RUN
    if run.is_file():
        try:
            old = json.loads(run.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Phi3FastError(f"{run}: unreadable ({e}); delete {out} to start over") from None
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise Phi3FastError(
                f"{out}: holds a run with other settings ({', '.join(changed)} differ); "
                "use another output directory or delete this one"
            )
    else:
        atomic_write_text(run, json.dumps(settings, indent=2) + "\n")


def read_answers(path: Path) -> list[dict[str, Any]]:
    """The rows of answers.jsonl; an incomplete last line (an interrupted write) is dropped from the file."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines):
                raise Phi3FastError(f"{path}:{i}: not valid JSON; delete the file to start over") from None
            atomic_write_text(path, "".join(lines[:-1]))
    return rows


def dequantize_base(model: Any) -> None:
    """Replace every NF4 base weight by its dequantized values, stored dense.

    The model computes the same function (the weights NF4 holds; a LoRA adapter applies on top as in training)
    with dense matmuls: on a CPU without NF4 kernels, decoding one token then no longer dequantizes every weight.
    Only the rounding order of the matmuls differs from the NF4 path.
    """
    for lin in model.linears().values():
        if lin.nf4 is not None:
            lin.set_base(lin.dense_weight(model.dtype))


def _generate(model: Any, messages: list[dict[str, str]], cfg: AnswerConfig) -> tuple[str, int]:
    """stream_chat's reply (the same token stream, detokenized the same way) and the number of tokens in it."""
    from phi3fast.generate import chat_prompt_ids, detokenize, generate_tokens, stop_ids

    n = 0

    def counted(tokens: Iterator[int]) -> Iterator[int]:
        nonlocal n
        for t in tokens:
            n += 1
            yield t

    tokens = generate_tokens(
        model,
        chat_prompt_ids(model, messages),
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        stop=stop_ids(model),
    )
    reply = "".join(detokenize(model.tokenizer, counted(tokens)))
    return reply, n


def _answer(model: Any, index: Any, mode: str, q: Question, cfg: EvalConfig) -> dict[str, Any]:
    """One question in one mode: the reply, what it cited, and the figures that need the model or index."""
    from phi3fast.rag.answer import build_messages, cited, fit_passages

    rag = mode in RAG_MODES
    answer_cfg = AnswerConfig(max_new_tokens=cfg.max_new_tokens)
    t0 = time.perf_counter()
    if rag:
        # phi3fast query --model: hybrid top k, then stream_answer's own steps (fit the context, its prompt).
        results = index.search(q.question, k=cfg.k)
        kept = fit_passages(model, q.question, results, cfg.max_new_tokens)
        messages = build_messages(q.question, kept)
    else:
        messages = [{"role": "user", "content": q.question}]
    reply, new_tokens = _generate(model, messages, answer_cfg)
    latency = time.perf_counter() - t0
    return {
        "id": q.line,
        "question": q.question,
        "mode": mode,
        "reply": reply,
        "cited": [kept[i - 1].source for i in cited(reply, len(kept))] if rag else [],
        "correct": is_correct(reply, q.answers),
        "answers": list(q.answers),
        "source": q.source,
        "category": q.category,
        "retrieved": [r.source for r in results] if rag else None,
        "given": len(kept) if rag else None,  # passages that fit the context (a prefix of retrieved)
        "abstained": abstains(reply) if rag else None,
        "token_f1": token_f1(reply, q.answers),
        "latency_s": latency,
        "new_tokens": new_tokens,
    }


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_answers(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Answer every pending (question, mode) pair into cfg.out/answers.jsonl; return the rows of cfg.modes."""
    check_modes(cfg.modes, cfg.adapter, cfg.index)
    if cfg.k < 1 or cfg.max_new_tokens < 1:
        raise Phi3FastError(f"k and max_new_tokens must be >= 1, got {cfg.k} and {cfg.max_new_tokens}")
    questions = load_questions(cfg.questions)  # every row checked before any model loads
    if cfg.out.exists() and not cfg.out.is_dir():
        raise Phi3FastError(f"{cfg.out}: exists and is not a directory")
    cfg.out.mkdir(parents=True, exist_ok=True)
    _check_run(cfg.out, _settings(cfg))
    path = cfg.out / ANSWERS
    done = {(r["id"], r["mode"]): r for r in read_answers(path)}
    # Modes without the adapter first: the adapter is then applied once, to the same loaded model.
    order = sorted(cfg.modes, key=lambda m: (m.startswith("ft"), MODES.index(m)))
    pending = [(m, q) for m in order for q in questions if (q.line, m) not in done]
    if pending:
        _run_pending(cfg, pending, path, done)
    return [done[(q.line, m)] for m in cfg.modes for q in questions]


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Answer, score and write report.json, report.md and report.png to cfg.out; return the report."""
    rows = run_answers(cfg)
    report = build_report(rows, cfg.modes)
    write_report(cfg.out, report)
    return report


def _run_pending(
    cfg: EvalConfig, pending: list[tuple[str, Question]], path: Path, done: dict[tuple[int, str], dict]
) -> None:
    from tqdm import tqdm

    from phi3fast.lora import load_adapter
    from phi3fast.model import load
    from phi3fast.model.loading import resolve_model_dir

    if any(m.startswith("ft") for m, _ in pending):
        from phi3fast.lora import read_adapter_config

        read_adapter_config(resolve_model_dir(cfg.adapter))  # a bad adapter fails before the long model load
    index = None
    if any(m in RAG_MODES for m, _ in pending):
        from phi3fast.rag import Index

        index = Index.open(cfg.index)
        if len(index) == 0:
            raise Phi3FastError(f"{cfg.index}: the index holds no passages")
    model = load(cfg.model)  # as `phi3fast query --model` loads it (NF4 base)
    if cfg.dequantize:
        dequantize_base(model)
    # Untimed warm-up: the first question of a mode must not pay for the embedder load or lazy inits.
    _generate(model, [{"role": "user", "content": pending[0][1].question}], AnswerConfig(max_new_tokens=1))
    if index is not None:
        index.search(pending[0][1].question, k=cfg.k)
    has_adapter = False
    bar = tqdm(total=len(pending), desc="eval", unit="answer", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for mode, q in pending:
            if mode.startswith("ft") and not has_adapter:
                load_adapter(model, resolve_model_dir(cfg.adapter))
                has_adapter = True
            bar.set_postfix_str(mode, refresh=False)
            row = _answer(model, index, mode, q, cfg)
            _append(path, row)
            done[(q.line, mode)] = row
            bar.update(1)
    finally:
        bar.close()
