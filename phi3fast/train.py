"""The lean QLoRA training loop behind `phi3fast train`.

One optimizer step takes the next global batch of batch_size x grad_accum x world rows from a seeded,
epoch-by-epoch shuffled stream of rows. Every micro-batch's summed token loss is divided by the target count of
the whole global batch, so gradient accumulation and data parallelism are exactly one large batch. AdamW
updates only the LoRA factors (fp32 master weights, so fp32 state), after clipping; the schedule is linear warmup
then cosine decay. Rank 0 writes metrics.jsonl, loss.png, checkpoints and the PEFT adapter.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from phi3fast import distributed
from phi3fast.checkpoint import (
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from phi3fast.data import Row, build_rows, collate, load_rows
from phi3fast.errors import Phi3FastError
from phi3fast.loss import chunked_cross_entropy

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


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
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.seq_len >= 2, "--seq-len must be >= 2"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.epochs is None or self.epochs > 0, "--epochs must be > 0"),
            (self.lr > 0, "--lr must be > 0"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (self.rank >= 1, "--rank must be >= 1"),
            (0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)"),
            (self.save_every >= 0 and self.eval_every >= 0, "--save-every and --eval-every must be >= 0"),
            (self.quantize in ("nf4", "none"), f"--quantize must be nf4 or none, got {self.quantize!r}"),
            (
                self.dtype in ("auto", *DTYPES),
                f"--dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}",
            ),
            (bool(self.target_modules), "--target-modules must name at least one module"),
            (
                self.kernels in ("auto", "triton", "torch"),
                f"--kernels must be auto, triton or torch, got {self.kernels!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise Phi3FastError(message)
        unknown = set(self.target_modules) - set(TARGETS)
        if unknown:
            raise Phi3FastError(
                f"--target-modules: unknown {sorted(unknown)}; choose from {', '.join(TARGETS)}"
            )


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer steps completed
    loss: float  # last step's loss
    out: Path
    adapter: Path | None  # None when interrupted before the end
    checkpoint: Path | None  # the last checkpoint written
    interrupted: str | None = None  # signal name when stopped by SIGINT/SIGTERM
    losses: list[float] = field(default_factory=list)  # per step of this run


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 makes bf16 matmuls faster than fp32 on CPU; without them bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_kernels(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend --kernels NAME runs on `device` with `dtype` activations ('triton' or 'torch'); checked
    before the model loads, so `--kernels triton` on a CPU without the interpreter fails at once."""
    from phi3fast.kernels.reference import resolve_backend

    try:
        return resolve_backend(name, device, dtype, gemm=False)
    except Phi3FastError as exc:
        raise Phi3FastError(f"--kernels {name}: {exc}") from None


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over cfg.warmup steps, then cosine."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(total - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LossScaler:
    """Dynamic loss scaling for fp16: scale up the loss so small gradients survive fp16, skip steps whose
    gradients overflowed and halve the scale, double it after `interval` clean steps."""

    def __init__(self, enabled: bool, scale: float = 2.0**16, interval: int = 1000) -> None:
        self.enabled, self.scale, self.interval, self.good = enabled, scale if enabled else 1.0, interval, 0

    def unscale_and_check(self, params: list[torch.nn.Parameter]) -> bool:
        """Divide grads by the scale; False (skip the step) if any is inf/nan."""
        if not self.enabled:
            return True
        finite = True
        for p in params:
            if p.grad is not None:
                p.grad.div_(self.scale)
                finite = finite and bool(torch.isfinite(p.grad).all())
        if finite:
            self.good += 1
            if self.good % self.interval == 0:
                self.scale *= 2.0
        else:
            self.scale, self.good = max(self.scale / 2.0, 1.0), 0
        return finite

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.scale, self.good = float(sd["scale"]), int(sd["good"])


class DataOrder:
    """Row order: epoch e is a permutation seeded by (seed, e); the stream of epochs is cut into global batches.
    The order is a pure function of (seed, step), so resuming needs only the step."""

    def __init__(self, n_rows: int, seed: int) -> None:
        self.n, self.seed, self._epoch, self._perm = n_rows, seed, -1, torch.empty(0, dtype=torch.long)

    def rows(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.n)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
            out.append(int(self._perm[offset]))
        return out


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class _Signals:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and returns. A second
    SIGINT falls through to the default handler (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.caught: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.caught and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.caught = signal.Signals(signum).name

    def __enter__(self) -> _Signals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _fingerprint(cfg: TrainConfig, n_rows: int, total_steps: int, world: int) -> dict[str, Any]:
    """What a checkpoint's step count means: resuming with any of these changed would not continue the run."""
    keys = ("batch_size", "grad_accum", "seq_len", "packing", "seed", "rank", "alpha", "target_modules", "lr")
    return {**{k: getattr(cfg, k) for k in keys}, "target_modules": list(cfg.target_modules),
            "n_rows": n_rows, "total_steps": total_steps, "world": world}  # fmt: skip


class MetricsLog:
    """metrics.jsonl (one object per optimizer step, plus eval fields) and loss.png, on rank 0."""

    def __init__(self, out: Path, resume_step: int | None) -> None:
        self.path = out / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            # Keep the history up to the checkpoint; steps logged after it are about to be redone.
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a hard kill
                if row.get("step", 0) <= resume_step:
                    self.rows.append(row)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, out: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        path, tmp = out / "loss.png", out / "loss.png.tmp"
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)
        return path


def _micro_loss(
    model: Any, rows: list[Row], pad_id: int, device: torch.device, kernels: str = "auto"
) -> tuple[torch.Tensor, int]:
    """Summed token loss of one micro-batch (fp32, differentiable) and its real token count."""
    b = collate(rows, pad_id)
    to = lambda t: None if t is None else t.to(device, non_blocking=True)
    hidden = model.hidden_states(to(b.input_ids), to(b.position_ids), to(b.seq_ids))
    loss = chunked_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, to(b.labels).reshape(-1), backend=kernels
    )
    return loss, b.n_tokens


@torch.no_grad()
def evaluate(model: Any, rows: list[Row], cfg: TrainConfig, pad_id: int, dd: distributed.Dist) -> float:
    """Mean token loss over all eval rows (rows sharded across ranks; sums and counts all-reduced)."""
    was_training = model.training
    model.eval()
    mine = rows[dd.rank :: dd.world]
    total = torch.zeros(2, dtype=torch.float64, device=dd.device)
    for i in range(0, len(mine), cfg.batch_size):
        chunk = mine[i : i + cfg.batch_size]
        loss, _ = _micro_loss(model, chunk, pad_id, dd.device, cfg.kernels)
        total += torch.tensor(
            [float(loss), sum(r.n_targets for r in chunk)], dtype=torch.float64, device=dd.device
        )
    distributed.all_reduce_sum_([total])
    model.train(was_training)
    return float(total[0] / total[1].clamp_min(1))


def train(cfg: TrainConfig, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run (or resume) a LoRA/QLoRA fine-tune; returns when done or after a SIGINT/SIGTERM checkpoint.

    on_step(step, metrics) is called on every rank after each optimizer step (tests use it to interrupt a run).
    """
    from phi3fast import lora
    from phi3fast.model import load

    dd = distributed.init()
    try:
        return _train(cfg, dd, on_step, lora, load)
    finally:
        distributed.shutdown()


def _train(cfg: TrainConfig, dd: distributed.Dist, on_step: Any, lora: Any, load: Any) -> TrainResult:
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(cfg.dtype, dd.device)
    kernels = resolve_kernels(cfg.kernels, dd.device, dtype)

    # Bad rows and a damaged checkpoint are reported before the (slow) model load.
    examples = load_rows(cfg.data)
    eval_examples = load_rows(cfg.eval_data) if cfg.eval_data else []
    resume_from = latest_checkpoint(ckpt_root) if cfg.resume else None
    if not cfg.resume and checkpoints(ckpt_root):
        raise Phi3FastError(
            f"{ckpt_root} holds checkpoints of an earlier run: pass --resume to continue it, or use another --out"
        )
    model = load(cfg.model, dtype=dtype, device=dd.device, quantize=None if cfg.quantize == "none" else "nf4")
    tokenizer = model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, stats = build_rows(examples, tokenizer, cfg.seq_len, cfg.packing)
    eval_rows = build_rows(eval_examples, tokenizer, cfg.seq_len, cfg.packing)[0] if eval_examples else []

    torch.manual_seed(cfg.seed)  # LoRA init, identical on every rank (and broadcast to make sure)
    lora.apply_lora(
        model,
        lora.LoraConfig(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules),
    )
    params = lora.lora_parameters(model)
    if any(p.dtype != torch.float32 for p in params):
        raise RuntimeError("LoRA parameters must be fp32 master weights (AdamW keeps fp32 state)")
    distributed.broadcast_(params)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.set_kernel_backend(cfg.kernels)
    model.train()

    micro = cfg.batch_size
    per_step = micro * cfg.grad_accum * dd.world
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    total_steps = (
        cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(epochs * len(rows) / per_step))
    )
    order = DataOrder(len(rows), cfg.seed)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay
    )
    scaler = LossScaler(enabled=dtype == torch.float16)
    fingerprint = _fingerprint(cfg, len(rows), total_steps, dd.world)

    start, tokens_seen = 0, 0
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        saved = ck["trainer"]["fingerprint"]
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)} -> {fingerprint.get(k)}" for k in changed)
            raise Phi3FastError(f"--resume: {resume_from} was made with different settings ({detail})")
        lora.load_lora_state_dict(model, {k: v.to(dd.device) for k, v in ck["lora"].items()})
        optimizer.load_state_dict(ck["optimizer"]["adamw"])
        scaler.load_state_dict(ck["optimizer"]["scaler"])
        start = int(ck["trainer"]["step"])
        tokens_seen = int(ck["trainer"]["tokens"])
        set_rng_state(ck["rng"][dd.rank])
    elif cfg.resume and dd.main:
        print(f"--resume: no complete checkpoint in {ckpt_root}; starting at step 0", file=sys.stderr)
    log = MetricsLog(out, start) if dd.main else None
    if dd.main and (stats.truncated or stats.dropped):
        print(f"note: of the samples longer than --seq-len {cfg.seq_len}, {stats.truncated} were truncated and "
              f"{stats.dropped} (nothing to learn left) were skipped", file=sys.stderr)  # fmt: skip

    from tqdm import tqdm

    bar = tqdm(
        total=total_steps,
        initial=start,
        disable=not (dd.main and cfg.progress),
        unit="step",
        dynamic_ncols=True,
    )
    losses: list[float] = []
    last_ckpt: Path | None = resume_from
    loss_value = float("nan")

    def checkpoint(step: int) -> Path | None:
        path = None
        rngs = distributed.all_gather_object(rng_state())  # every rank's, so each resumes its own dropout
        if dd.main:
            trainer_state = {"fingerprint": fingerprint, "tokens": tokens_seen, "config": asdict(cfg)}
            optim = {"adamw": optimizer.state_dict(), "scaler": scaler.state_dict()}
            path = save_checkpoint(ckpt_root, step, lora.lora_state_dict(model), optim, trainer_state, rngs)
        distributed.barrier()
        return path

    with _Signals() as signals:
        step = start
        while step < total_steps:
            t0 = time.perf_counter()
            batch_rows = [rows[i] for i in order.rows(step * per_step, per_step)]
            n_targets = sum(r.n_targets for r in batch_rows)  # of the WHOLE global batch: every rank knows it
            denom = max(n_targets, 1)
            loss_sum = torch.zeros((), dtype=torch.float32, device=dd.device)
            for m in range(cfg.grad_accum):
                j = m * dd.world + dd.rank  # this rank's micro-batch j of the global batch
                loss, _ = _micro_loss(
                    model, batch_rows[j * micro : (j + 1) * micro], pad_id, dd.device, cfg.kernels
                )
                (loss * (scaler.scale / denom)).backward()
                loss_sum += loss.detach()
            grads = [p.grad for p in params if p.grad is not None]
            distributed.all_reduce_sum_([*grads, loss_sum.view(1)])
            if scaler.unscale_and_check(params):
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                lr = lr_at(step, cfg, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
            else:
                lr = 0.0  # skipped: fp16 overflow, the scale was halved
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if dd.device.type == "cuda":
                torch.cuda.synchronize(dd.device)
            dt = time.perf_counter() - t0
            step_tokens = sum(r.n_tokens for r in batch_rows)
            tokens_seen += step_tokens
            loss_value = float(loss_sum) / denom
            losses.append(loss_value)
            metrics: dict[str, Any] = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "tokens": tokens_seen,
                "tokens_per_s": step_tokens / dt,
                "peak_mem_bytes": int(distributed.max_across(peak_memory_bytes(dd.device), dd.device)),
                "kernels": kernels,
            }
            if eval_rows and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
                metrics["eval_loss"] = evaluate(model, eval_rows, cfg, pad_id, dd)
                metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50.0))
            if log is not None:
                log.write(metrics)
            bar.update(1)
            postfix = {"loss": f"{loss_value:.4f}", "tok/s": f"{metrics['tokens_per_s']:.0f}",
                       "mem": f"{metrics['peak_mem_bytes'] / 2**30:.2f}G"}  # fmt: skip
            bar.set_postfix(ordered_dict=postfix)  # tqdm adds the ETA
            if on_step is not None:
                on_step(step, metrics)
            stop = distributed.any_rank(signals.caught is not None, dd.device)
            if stop or (cfg.save_every and step % cfg.save_every == 0 and step < total_steps):
                last_ckpt = checkpoint(step)
            if stop:
                bar.close()
                if log is not None:
                    log.plot(out)
                return TrainResult(
                    step, loss_value, out, None, last_ckpt, signals.caught or "SIGTERM", losses
                )
    bar.close()
    adapter = None
    if dd.main:
        lora.save_adapter(model, out)
        log.plot(out)
        adapter = out
    distributed.barrier()
    return TrainResult(step, loss_value, out, adapter, last_ckpt, None, losses)
