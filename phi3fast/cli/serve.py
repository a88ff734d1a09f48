"""`phi3fast serve`: the OpenAI-compatible server (argument parsing only; the work is in phi3fast.serve)."""

from __future__ import annotations

from pathlib import Path

import click

from phi3fast.cli.app import main, user_errors
from phi3fast.errors import Phi3FastError


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise Phi3FastError(f"{flag} {v!r}: expected NAME=DIR")
        if name in out:
            raise Phi3FastError(f"{flag} {name}: given twice")
        out[name] = Path(path)
    return out


@main.command("serve")
@click.option("--model", "model_dir", required=True, help="base Phi-3 checkpoint directory (or Hub id)")
@click.option(
    "--adapter", "adapters", multiple=True, metavar="NAME=DIR", help="PEFT LoRA adapter served as NAME"
)
@click.option(
    "--index", "indexes", multiple=True, metavar="NAME=DIR", help="RAG index for 'rag': {'index': NAME}"
)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key", default=None, envvar="PHI3FAST_API_KEY", help="require 'Authorization: Bearer KEY'"
)
@click.option(
    "--max-batch", default=8, show_default=True, type=click.IntRange(min=1), help="sequences per step"
)
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0), help="waiting requests before 429")  # fmt: skip
@click.option("--max-context", default=None, type=click.IntRange(min=2), help="tokens per sequence [default: the model's]")  # fmt: skip
@click.option("--max-body", default=4 * 1024 * 1024, show_default=True, type=click.IntRange(min=1024), help="bytes; larger bodies get 413")  # fmt: skip
@click.option("--quantize", default="nf4", show_default=True, type=click.Choice(["nf4", "none"]))
@click.option("--name", "base_name", default=None, help="the base model's id in the API [default: the model folder's name]")  # fmt: skip
@user_errors
def serve_cmd(
    model_dir: str,
    adapters: tuple[str, ...],
    indexes: tuple[str, ...],
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    max_queue: int,
    max_context: int | None,
    max_body: int,
    quantize: str,
    base_name: str | None,
) -> None:
    """Serve a model, its adapters and indexes over an OpenAI-compatible API, with a chat page at /."""
    from phi3fast.serve import run_server

    adapter_dirs, index_dirs = _pairs(adapters, "--adapter"), _pairs(indexes, "--index")
    run_server(
        model_dir,
        adapters=adapter_dirs,
        indexes=index_dirs,
        host=host,
        port=port,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        max_context=max_context,
        max_body=max_body,
        quantize=None if quantize == "none" else quantize,
        base_name=base_name,
    )
