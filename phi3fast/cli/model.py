"""Model verbs: init-tiny, generate, merge (argument parsing only; the work is in phi3fast.model.tiny, phi3fast.generate and phi3fast.lora.merge)."""

from __future__ import annotations

import sys
from typing import Any

import click

from phi3fast.cli.app import main, user_errors

# phi3fast.kernels.backend.DTYPES's names, spelled here so that --help does not import torch and triton.
_DTYPES = ("auto", "fp32", "bf16", "fp16")


def _quantize(value: str) -> str | None:
    return None if value == "none" else value


def _dtype(name: str) -> Any:
    from phi3fast.kernels.backend import DTYPES

    return None if name == "auto" else DTYPES[name]


@main.command("init-tiny")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--hidden", default=256, show_default=True, help="hidden size")
@click.option("--layers", default=2, show_default=True, help="decoder layers")
@click.option("--heads", default=4, show_default=True, help="attention heads")
@click.option("--intermediate", default=512, show_default=True, help="MLP size")
@click.option("--vocab", default=2048, show_default=True, help="embedding rows (>= the BPE tokenizer's size)")
@click.option("--seed", default=0, show_default=True, help="weight seed")
@user_errors
def init_tiny_cmd(
    out: str, hidden: int, layers: int, heads: int, intermediate: int, vocab: int, seed: int
) -> None:
    """Write a small random Phi-3 checkpoint (transformers format, BPE tokenizer with Phi-3's chat tokens)."""
    from phi3fast.model.tiny import init_tiny

    path = init_tiny(
        out, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate, vocab=vocab, seed=seed
    )
    click.echo(f"wrote {path}")


@main.command()
@click.argument("prompt")
@click.option("--model", "model_dir", required=True, help="checkpoint directory or Hub id")
@click.option("--adapter", default=None, help="PEFT LoRA adapter: directory or Hub id")
@click.option("--system", default=None, help="system message")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 = greedy"
)
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", default=None, type=int, help="sampling seed (reproducible sampling)")
@click.option("--quantize", default="nf4", show_default=True, type=click.Choice(["nf4", "none"]))
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(list(_DTYPES)))
@click.option(
    "--lm-head",
    "lm_head",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "bfloat16", "int8"]),
    help="store the vocabulary projection narrower (CPU decode reads less; rounds the head: output can differ)",
)
@user_errors
def generate(
    prompt: str,
    model_dir: str,
    adapter: str | None,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    quantize: str,
    dtype: str,
    lm_head: str,
) -> None:
    """Chat with a Phi-3 checkpoint (plus an adapter); the reply streams to stdout."""
    from phi3fast.generate import stream_chat
    from phi3fast.model import load
    from phi3fast.model.lm_head import store_lm_head

    model = load(model_dir, adapter=adapter, quantize=_quantize(quantize), dtype=_dtype(dtype))
    store_lm_head(model, lm_head)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    pieces = stream_chat(
        model, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@main.command()
@click.option("--model", "model_dir", required=True, help="base checkpoint directory or Hub id")
@click.option("--adapter", required=True, help="PEFT LoRA adapter: directory or Hub id")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="new checkpoint directory")
@click.option(
    "--quantize",
    default="nf4",
    show_default=True,
    type=click.Choice(["nf4", "none"]),
    help="the base the adapter was trained on: nf4 (QLoRA) merges into dequantized NF4 weights",
)
@click.option(
    "--dtype", default="auto", show_default=True, type=click.Choice(list(_DTYPES)), help="auto = base's"
)
@user_errors
def merge(model_dir: str, adapter: str, out: str, quantize: str, dtype: str) -> None:
    """Fold a LoRA adapter into its base: a plain transformers checkpoint."""
    from phi3fast.lora.merge import merge_adapter

    path = merge_adapter(model_dir, adapter, out, quantize=_quantize(quantize), dtype=_dtype(dtype))
    click.echo(f"wrote {path}")
