"""`phi3fast eval` and `phi3fast rag-data`: thin shells over phi3fast.eval."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from phi3fast.cli.app import main, user_errors
from phi3fast.errors import Phi3FastError


def _check_modes_flags(spec: str, adapter: str | None, index: Path | None) -> tuple[str, ...]:
    """The library's mode checks, worded with this verb's flags."""
    from phi3fast.eval.runner import lacking, parse_modes

    try:
        modes = parse_modes(spec)
    except Phi3FastError as e:
        raise Phi3FastError(f"--{e}") from None
    gap = lacking(modes, adapter, index)
    if gap is not None:
        m, what = gap
        flags = " and ".join(f"--{w}" for w in what)
        raise Phi3FastError(
            f"--modes: {m} needs {flags}; give {'them' if len(what) > 1 else 'it'} or leave {m} out of --modes"
        )
    return modes


@main.command("eval")
@click.option("--model", required=True, help="Phi-3 checkpoint directory or Hugging Face Hub id.")
@click.option("--adapter", default=None, help="PEFT LoRA adapter for the ft and ft+rag modes.")
@click.option("--index", "index_dir", type=click.Path(path_type=Path), default=None,
              help="Index directory (phi3fast index) for the rag and ft+rag modes.")  # fmt: skip
@click.option("--questions", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help='JSONL rows {"question", "answer": str | [str, ...], "source"?, "category"?}.')  # fmt: skip
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output directory: answers.jsonl, report.json, report.md, report.png (a rerun resumes).")  # fmt: skip
@click.option(
    "--modes", default="base,rag,ft,ft+rag", show_default=True, help="Comma-separated modes to run."
)
@click.option(
    "-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="Passages per question."
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--dequantize", is_flag=True,
              help="Decode with the NF4 base's weights dequantized (the same model, dense matmuls): faster on "
              "CPUs without NF4 kernels; replies may differ from `query` where a rounding flips a greedy token.")  # fmt: skip
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
def eval_cmd(
    model: str,
    adapter: str | None,
    index_dir: Path | None,
    questions: Path,
    out: Path,
    modes: str,
    k: int,
    max_new_tokens: int,
    dequantize: bool,
    no_progress: bool,
) -> None:
    """Answer a labelled question set in each mode (base, rag, ft, ft+rag) and compare them.

    Greedy decoding: a rerun gives the same replies. An interrupted run continues where it stopped.
    """
    from phi3fast.eval import EvalConfig, run_eval
    from phi3fast.eval.report import render_markdown

    cfg = EvalConfig(
        model=model,
        questions=questions,
        out=out,
        adapter=adapter,
        index=index_dir,
        modes=_check_modes_flags(modes, adapter, index_dir),
        k=k,
        max_new_tokens=max_new_tokens,
        dequantize=dequantize,
        progress=not no_progress,
    )
    report = run_eval(cfg)
    click.echo(render_markdown(report))
    click.echo(f"wrote {out}/report.json, report.md, report.png and answers.jsonl")


@main.command("rag-data")
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=Path), help="Index directory.")
@click.option("--questions", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help='JSONL rows {"question", "answer", "source"} (the training half of a question set).')  # fmt: skip
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help='Training rows {"messages": [...]} for phi3fast train.')  # fmt: skip
@click.option(
    "-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="Passages per question."
)
@click.option("--no-gold-fraction", type=click.FloatRange(0.0, 1.0), default=0.2, show_default=True,
              help="Share of rows whose gold passage is removed; their target is the abstention sentence.")  # fmt: skip
@click.option("--rows-per-question", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rows per question: the first in retrieval order, the others with the passages rotated "
              "(the gold passage at another number).")  # fmt: skip
@click.option("--target", "target_kind", type=click.Choice(["sentence", "answer"]), default="sentence",
              show_default=True, help="sentence: the gold passage's sentence holding the answer, copied, then "
              "[n]; answer: the first acceptable answer, then [n].")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the choice of abstention rows.")
@user_errors
def rag_data_cmd(
    index_dir: Path,
    questions: Path,
    out: Path,
    k: int,
    no_gold_fraction: float,
    rows_per_question: int,
    target_kind: str,
    seed: int,
) -> None:
    """Turn question/answer/source rows into chat rows with the exact RAG prompt of `phi3fast query --model`."""
    from phi3fast.eval.questions import load_questions
    from phi3fast.eval.ragdata import check_target, rag_rows, write_rows
    from phi3fast.rag import Index

    rows_in = load_questions(questions, need_source=True)
    check_target(out)
    index = Index.open(index_dir)
    rows, s = rag_rows(
        index,
        rows_in,
        k=k,
        no_gold_fraction=no_gold_fraction,
        seed=seed,
        rows_per_question=rows_per_question,
        target_kind=target_kind,
    )
    write_rows(out, rows)
    click.echo(
        f"{out}: {s.rows} rows ({s.cited} cite the gold passage, {s.removed} with the gold passage removed, "
        f"{s.missed} whose source was not in the top {k}; the last two answer with the abstention sentence)"
    )
    if target_kind == "sentence":
        click.echo(f"{s.sentences} of the {s.cited} citing targets copy a sentence of the gold passage")
    sys.stdout.flush()
