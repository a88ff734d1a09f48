"""TrainConfig: every option of a LoRA / QLoRA fine-tune, checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass

from phi3fast.errors import ArgumentError
from phi3fast.kernels.backend import BACKENDS, DTYPES
from phi3fast.lora.adapter import TARGETS


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `phi3fast train` (the CLI builds one of these and calls train)."""

    model: str
    data: str
    out: str
    eval_data: str | None = None
    max_steps: int | None = None  # wins over epochs when both are given
    epochs: float | None = None  # None and no max_steps: one epoch
    batch_size: int = 4  # rows per micro-batch, per process
    grad_accum: int = 1
    seq_len: int = 1024
    lr: float = 2e-4
    warmup: int = 10  # steps of linear warmup
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = TARGETS
    seed: int = 0
    save_every: int = 100  # 0: only on interrupt
    eval_every: int = 0  # 0: only at the end (when eval_data is given)
    resume: bool = False
    gradient_checkpointing: bool = False
    packing: bool = False
    quantize: str = "nf4"  # 'nf4' (QLoRA) or 'none' (LoRA over a 16-bit base)
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    # Row-wise kernels (RMSNorm, RoPE, SwiGLU, the fused cross-entropy): auto = Triton on CUDA, torch on CPU;
    # 'triton' on CPU runs Triton's interpreter (tests: TRITON_INTERPRET=1).
    kernels: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.grad_accum >= 1, "grad_accum", "must be >= 1"),
            (self.seq_len >= 2, "seq_len", "must be >= 2"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1"),
            (self.epochs is None or self.epochs > 0, "epochs", "must be > 0"),
            (self.lr > 0, "lr", "must be > 0"),
            (self.warmup >= 0, "warmup", "must be >= 0"),
            (self.rank >= 1, "rank", "must be >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)"),
            (self.save_every >= 0, "save_every", "must be >= 0"),
            (self.eval_every >= 0, "eval_every", "must be >= 0"),
            (self.quantize in ("nf4", "none"), "quantize", f"must be nf4 or none, got {self.quantize!r}"),
            (
                self.dtype in ("auto", *DTYPES),
                "dtype",
                f"must be auto, bf16, fp16 or fp32, got {self.dtype!r}",
            ),
            (bool(self.target_modules), "target_modules", "must name at least one module"),
            (self.kernels in BACKENDS, "kernels", f"must be auto, triton or torch, got {self.kernels!r}"),
        ]
        for ok, argument, problem in checks:
            if not ok:
                raise ArgumentError(argument, problem)
        unknown = set(self.target_modules) - set(TARGETS)
        if unknown:
            raise ArgumentError(
                "target_modules", f"has unknown {sorted(unknown)}; choose from {', '.join(TARGETS)}"
            )
