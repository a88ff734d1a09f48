"""`phi3fast index` and `phi3fast query`: thin shells over phi3fast.rag."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from phi3fast.cli.app import main, user_errors
from phi3fast.errors import Phi3FastError

if TYPE_CHECKING:
    from phi3fast.model import Phi3ForCausalLM


@main.command("index")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Index directory.")
@click.option(
    "--embedder",
    default=None,
    help="sentence-transformers name or folder, or openai:MODEL (default: the bundled all-MiniLM-L6-v2, or "
    "the index's own).",
)
@click.option("--chunk-tokens", type=int, default=None, help="Max embedder tokens per chunk [default: 128].")
@click.option("--overlap", type=int, default=None, help="Tokens shared by consecutive chunks [default: 16].")
@click.option(
    "--store",
    default=None,
    metavar="builtin|milvus:URI",
    help="Where chunks and vectors live: builtin (SQLite + HNSW in --out, the default for a new index) or "
    "milvus:http://host:19530 (token from $MILVUS_TOKEN) or milvus:./rag.db (Milvus Lite). "
    "Re-runs keep the index's store.",
)
@click.option(
    "--export-parquet",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write every chunk (id, vector, text, metadata) to this Parquet file (Milvus bulk-import format).",
)
@click.option(
    "--trust-remote-code", is_flag=True, help="Let the embedder run the modelling code it ships (e.g. jina)."
)
@click.option(
    "--reranker",
    default=None,
    metavar="CROSS_ENCODER",
    help="A sentence-transformers CrossEncoder (folder or name) that rescores the best hybrid results of "
    "every query; recorded in the index ('none' drops it). Re-runs keep the index's.",
)
@user_errors
def index_cmd(
    paths: tuple[Path, ...],
    out: Path,
    embedder: str | None,
    chunk_tokens: int | None,
    overlap: int | None,
    store: str | None,
    export_parquet: Path | None,
    trust_remote_code: bool,
    reranker: str | None,
) -> None:
    """Index documents (.md .txt .rst .html .pdf .jsonl) for `phi3fast query`; re-runs are incremental."""
    from phi3fast.rag import Index
    from phi3fast.rag.index import check_export_target

    if export_parquet is not None:
        check_export_target(export_parquet)
    index = Index.build(
        list(paths),
        out,
        embedder=embedder,
        chunk_tokens=chunk_tokens,
        overlap=overlap,
        store=store,
        reranker=reranker,
        trust_remote_code=trust_remote_code,
        progress=sys.stderr.isatty(),
    )
    s = index.build_stats
    assert s is not None
    click.echo(
        f"{out}: {s.chunks_total} chunks from {index.manifest['files']} files "
        f"(added {s.files_added}, changed {s.files_changed}, unchanged {s.files_unchanged}, "
        f"deleted {s.files_deleted}, skipped {s.files_skipped}); embedded {s.chunks_embedded} chunks "
        f"in {s.seconds:.1f} s ({s.chunks_per_second:.1f} chunks/s; {s.embed_seconds:.1f} s of it embedding)"
    )
    if export_parquet is not None:
        n = index.export_parquet(export_parquet)
        click.echo(f"{export_parquet}: {n} chunks (Parquet: id, vector, text and metadata)")


def _questions(question: str | None, from_file: Path | None) -> list[str]:
    if (question is None) == (from_file is None):
        raise Phi3FastError("give one QUESTION or --from-file FILE")
    if question is not None:
        return [question]
    try:
        lines = from_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise Phi3FastError(f"--from-file {from_file}: {e}") from None
    questions = [q.strip() for q in lines if q.strip()]
    if not questions:
        raise Phi3FastError(f"--from-file {from_file}: no questions in it")
    return questions


def _print_results(results: list) -> None:
    if not results:
        click.echo("  (no matches)")
    for r in results:
        where = f"{r.source}" + (f"  > {r.heading}" if r.heading else "")
        snippet = " ".join(r.text.split())
        snippet = snippet if len(snippet) <= 240 else snippet[:237] + "..."
        click.echo(f"[{r.rank}] {where}  (score {r.score:.4g}, chars {r.start}-{r.end})")
        click.echo(f"    {snippet}")


@main.command("query")
@click.argument("question", required=False)
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=Path), help="Index directory.")
@click.option(
    "-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="Results per question."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per question.")
@click.option(
    "--from-file", type=click.Path(path_type=Path), help="One question per line; prints JSON lines."
)
@click.option(
    "--mode", type=click.Choice(["hybrid", "dense", "keyword"]), default="hybrid", show_default=True
)
@click.option(
    "--embedder", default=None, help="Must be the embedder the index was built with (default: that one)."
)
@click.option(
    "--trust-remote-code", is_flag=True, help="Needed again for an index built with --trust-remote-code."
)
@click.option(
    "--model", "model_dir", default=None, help="Phi-3 checkpoint: answer from the passages, citing them."
)
@click.option("--adapter", default=None, help="PEFT LoRA adapter (directory or Hub id), with --model.")
@click.option(
    "--reranker",
    default=None,
    metavar="CROSS_ENCODER",
    help="Rescore hybrid results with this CrossEncoder instead of the index's own ('none': no reranking).",
)
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@user_errors
def query_cmd(
    question: str | None,
    index_dir: Path,
    k: int,
    as_json: bool,
    from_file: Path | None,
    mode: str,
    embedder: str | None,
    trust_remote_code: bool,
    model_dir: str | None,
    adapter: str | None,
    reranker: str | None,
    max_new_tokens: int,
) -> None:
    """Search an index: hybrid (dense HNSW + BM25, fused by normalised score) by default.

    With --model (and optionally --adapter) the model answers from the numbered passages and cites them.
    """
    from phi3fast.rag import Index

    if adapter is not None and model_dir is None:
        raise Phi3FastError("--adapter needs --model")
    questions = _questions(question, from_file)
    index = Index.open(index_dir, embedder=embedder, trust_remote_code=trust_remote_code, reranker=reranker)
    as_json = as_json or from_file is not None
    model = None
    if model_dir is not None:
        from phi3fast.model import load

        model = load(model_dir, adapter=adapter)
    for q in questions:
        results = index.search(q, k=k, mode=mode)  # the embedder loads once, on the first question
        if not as_json:
            click.echo(f"Q: {q}")
        answer = None if model is None else _answer(model, q, results, max_new_tokens, stream=not as_json)
        if as_json:
            obj = {"question": q, "results": [r.to_json() for r in results], "answer": answer}
            click.echo(json.dumps(obj, ensure_ascii=False))
        elif model is None:
            _print_results(results)


def _answer(model: Phi3ForCausalLM, question: str, results: list, max_new_tokens: int, stream: bool) -> str:
    """Generate the cited answer; when streaming, print it as it comes, then the sources under it."""
    from phi3fast.rag.answer import AnswerConfig, sources_block, stream_answer

    if not results:
        answer = "No passage in the index matches this question."
        if stream:
            click.echo(f"A: {answer}")
        return answer
    passages, pieces = stream_answer(model, question, results, AnswerConfig(max_new_tokens=max_new_tokens))
    out = []
    if stream:
        click.echo("A: ", nl=False)
    for piece in pieces:
        out.append(piece)
        if stream:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    answer = "".join(out)
    if stream:
        click.echo("\n" + sources_block(passages, answer))
    return answer
