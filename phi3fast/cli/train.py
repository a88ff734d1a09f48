"""`phi3fast train`: LoRA / QLoRA fine-tuning of a Phi-3 checkpoint on a JSONL file (see phi3fast.train)."""

from __future__ import annotations

import sys

import click

from phi3fast.cli.app import main, user_errors
from phi3fast.train import TARGETS


@main.command()
@click.option("--model", required=True, help="Phi-3 checkpoint directory or Hugging Face Hub id.")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Training rows (JSONL).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--eval-data", type=click.Path(dir_okay=False), help="Held-out rows (JSONL) for eval_loss.")
@click.option("--max-steps", type=int, help="Optimizer steps (wins over --epochs).")
@click.option("--epochs", type=float, help="Passes over the data [default: 1 when --max-steps is not given].")
@click.option(
    "--batch-size", type=int, default=4, show_default=True, help="Rows per micro-batch, per process."
)
@click.option(
    "--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step."
)
@click.option("--seq-len", type=int, default=1024, show_default=True, help="Max tokens per row.")
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option(
    "--warmup", type=int, default=10, show_default=True, help="Linear warmup steps before cosine decay."
)
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=32.0, show_default=True, help="LoRA alpha (scale = alpha / r).")
@click.option("--dropout", type=float, default=0.05, show_default=True, help="LoRA dropout.")
@click.option(
    "--target-modules",
    default=",".join(TARGETS),
    show_default=True,
    help="Comma-separated projections that get LoRA adapters.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--save-every", type=int, default=100, show_default=True, help="Checkpoint every N steps (0: off)."
)
@click.option(
    "--eval-every", type=int, default=0, show_default=True, help="Evaluate every N steps (0: at the end)."
)
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --out.")
@click.option(
    "--gradient-checkpointing", is_flag=True, help="Recompute each layer in backward (less memory)."
)
@click.option("--packing", is_flag=True, help="Pack several samples per --seq-len row (no cross-attention).")
@click.option("--quantize", type=click.Choice(["nf4", "none"]), default="nf4", show_default=True,
              help="nf4: QLoRA (4-bit base); none: LoRA over a 16-bit base.")  # fmt: skip
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Compute dtype; auto: bf16 on CUDA and on CPUs with native bf16, else fp32.")  # fmt: skip
@click.option("--kernels", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
              help="RMSNorm, RoPE, SwiGLU and cross-entropy kernels; auto: Triton on CUDA, PyTorch on CPU.")  # fmt: skip
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
def train(target_modules: str, no_progress: bool, **options: object) -> None:
    """Fine-tune LoRA adapters on DATA; writes a PEFT adapter, metrics.jsonl and loss.png to OUT.

    Data parallel: torchrun --nproc-per-node N -m phi3fast train ...
    """
    from phi3fast.train import TrainConfig
    from phi3fast.train import train as run

    targets = tuple(t.strip() for t in target_modules.split(",") if t.strip())
    cfg = TrainConfig(**options, target_modules=targets, progress=not no_progress)  # type: ignore[arg-type]
    result = run(cfg)
    if result.interrupted:
        click.echo(
            f"{result.interrupted}: stopped after step {result.steps}; checkpoint {result.checkpoint}; "
            "continue with --resume",
            err=True,
        )
        sys.exit(130 if result.interrupted == "SIGINT" else 143)
    first = f"{result.losses[0]:.4f} -> " if result.losses else ""
    click.echo(f"done: {result.steps} steps, loss {first}{result.loss:.4f}; adapter in {result.adapter}")
