"""Interop verbs: convert (Llama / GGUF in) and export (GGUF + Ollama out); the work is in phi3fast.interop."""

from __future__ import annotations

import click

from phi3fast.cli.app import main, user_errors


@main.command()
@click.argument("src")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="new Phi-3 checkpoint directory")
@click.option(
    "--dtype",
    default=None,
    type=click.Choice(["fp32", "bf16", "fp16"]),
    help="weight dtype (default: the source's; fp32 for a GGUF)",
)
@user_errors
def convert(src: str, out: str, dtype: str | None) -> None:
    """Convert a Llama-architecture checkpoint (directory or Hub id) or a .gguf file to a Phi-3 checkpoint."""
    from phi3fast.interop.convert import convert as run

    click.echo(f"wrote {run(src, out, dtype=dtype)}")


@main.command()
@click.option("--model", "model_dir", required=True, help="Phi-3 checkpoint directory or Hub id")
@click.option("--adapter", default=None, help="PEFT LoRA adapter to fold in (as phi3fast merge does)")
@click.option("--out", required=True, help="the GGUF file to write (FILE.gguf)")
@click.option("--type", "qtype", default="f16", show_default=True, type=click.Choice(["f16", "q8_0", "q4_0"]))
@click.option("--ollama", "ollama_dir", default=None, help="also write an Ollama Modelfile in this directory")
@user_errors
def export(model_dir: str, adapter: str | None, out: str, qtype: str, ollama_dir: str | None) -> None:
    """Export a Phi-3 checkpoint (plus an adapter) as a GGUF file for llama.cpp / Ollama."""
    from phi3fast.interop.export import export_gguf

    path = export_gguf(model_dir, out, adapter=adapter, qtype=qtype, ollama_dir=ollama_dir)
    click.echo(f"wrote {path}")
    if ollama_dir:
        click.echo(f"wrote {ollama_dir}/Modelfile (ollama create NAME -f {ollama_dir}/Modelfile)")
