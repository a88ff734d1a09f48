"""The LoRA / QLoRA training loop behind `phi3fast train`: a Trainer with its setup steps, one optimizer step,
checkpointing and evaluation.

One optimizer step takes the next global batch of batch_size x grad_accum x world rows from a seeded,
epoch-by-epoch shuffled stream of rows (data.DataOrder). Every micro-batch's summed token loss is divided by the
target count of the whole global batch, so gradient accumulation and data parallelism are exactly one large batch.
AdamW updates only the LoRA factors (fp32 master weights, so fp32 state), after clipping; the schedule is linear
warmup then cosine decay. Rank 0 writes metrics.jsonl, loss.png, checkpoints and the PEFT adapter.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from phi3fast.errors import ArgumentError, Phi3FastError
from phi3fast.kernels import pins
from phi3fast.kernels.backend import KernelInputError, resolve_backend
from phi3fast.lora import (
    LoraConfig,
    apply_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    save_adapter,
)
from phi3fast.model import load
from phi3fast.training import distributed
from phi3fast.training.checkpoint import (
    PINS,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from phi3fast.training.config import TrainConfig
from phi3fast.training.data import DataOrder, Row, build_rows, collate, load_rows
from phi3fast.training.loss import chunked_cross_entropy
from phi3fast.training.metrics import MetricsLog, peak_memory_bytes
from phi3fast.training.precision import LossScaler, resolve_dtype
from phi3fast.training.threads import all_threads, glue_threads

StepCallback = Callable[[int, dict[str, Any]], None]


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer steps completed
    loss: float  # last step's loss
    out: Path
    adapter: Path | None  # None when interrupted before the end
    checkpoint: Path | None  # the last checkpoint written
    interrupted: str | None = None  # signal name when stopped by SIGINT/SIGTERM
    losses: list[float] = field(default_factory=list)  # per step of this run


def resolve_kernels(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `kernels=name` runs on `device` with `dtype` activations ('triton' or 'torch'); checked
    before the model loads, so 'triton' on a CPU without the interpreter fails at once."""
    try:
        return resolve_backend(name, device, dtype, gemm=False)
    except KernelInputError as exc:
        raise ArgumentError("kernels", f"{name}: {exc}") from None


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over cfg.warmup steps, then cosine."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(total - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


class Trainer:
    """One run (or a resumed one) of cfg on this process's rank. `run()` sets everything up, trains, and returns
    when done or after a SIGINT/SIGTERM checkpoint; on_step(step, metrics) is called after each optimizer step."""

    def __init__(self, cfg: TrainConfig, dd: distributed.Dist, on_step: StepCallback | None = None) -> None:
        self.cfg, self.dd, self.on_step = cfg, dd, on_step
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.start = self.tokens_seen = 0
        self.last_ckpt: Path | None = None

    # ---- setup (in this order: every input error comes before the slow model load) ----------------------------

    def _setup_inputs(self) -> None:
        cfg, dd = self.cfg, self.dd
        if dd.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = resolve_dtype(cfg.dtype, dd.device)
        self.kernels = resolve_kernels(cfg.kernels, dd.device, self.dtype)
        self.examples = load_rows(cfg.data)
        self.eval_examples = load_rows(cfg.eval_data) if cfg.eval_data else []
        self.resume_from = latest_checkpoint(self.ckpt_root) if cfg.resume else None
        if not cfg.resume and checkpoints(self.ckpt_root):
            raise ArgumentError("resume", f"is off, but {self.ckpt_root} holds checkpoints of an earlier run: "
                                "resume it, or write to another out directory")  # fmt: skip
        self.last_ckpt = self.resume_from

    def _setup_model(self) -> None:
        cfg, dd = self.cfg, self.dd
        quantize = None if cfg.quantize == "none" else "nf4"
        self.model = load(cfg.model, dtype=self.dtype, device=dd.device, quantize=quantize)
        torch.manual_seed(cfg.seed)  # LoRA init, identical on every rank (and broadcast to make sure)
        lora = LoraConfig(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules)
        apply_lora(self.model, lora)
        self.params = lora_parameters(self.model)
        if any(p.dtype != torch.float32 for p in self.params):
            raise RuntimeError("LoRA parameters must be fp32 master weights (AdamW keeps fp32 state)")
        distributed.broadcast_(self.params)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.model.set_kernel_backend(cfg.kernels)
        self.model.train()

    def _setup_data(self) -> None:
        cfg = self.cfg
        tokenizer = self.model.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows, self.stats = build_rows(self.examples, tokenizer, cfg.seq_len, cfg.packing)
        self.eval_rows = (
            build_rows(self.eval_examples, tokenizer, cfg.seq_len, cfg.packing)[0]
            if self.eval_examples
            else []
        )
        self.per_step = cfg.batch_size * cfg.grad_accum * self.dd.world
        epochs = cfg.epochs if cfg.epochs is not None else 1.0
        self.total_steps = (
            cfg.max_steps
            if cfg.max_steps is not None
            else max(1, math.ceil(epochs * len(self.rows) / self.per_step))
        )
        self.order = DataOrder(len(self.rows), cfg.seed)

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay
        )
        self.scaler = LossScaler(enabled=self.dtype == torch.float16)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint's step count means: resuming with any of these changed would not continue the run."""
        cfg = self.cfg
        keys = (
            "batch_size",
            "grad_accum",
            "seq_len",
            "packing",
            "seed",
            "rank",
            "alpha",
            "target_modules",
            "lr",
        )
        return {**{k: getattr(cfg, k) for k in keys}, "target_modules": list(cfg.target_modules),
                "n_rows": len(self.rows), "total_steps": self.total_steps, "world": self.dd.world}  # fmt: skip

    def _resume(self) -> None:
        dd = self.dd
        if self.resume_from is None:
            if self.cfg.resume and dd.main:
                print(
                    f"resume: no complete checkpoint in {self.ckpt_root}; starting at step 0", file=sys.stderr
                )
            return
        ck = load_checkpoint(self.resume_from)
        saved, now = ck["trainer"]["fingerprint"], self.fingerprint()
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in changed)
            raise ArgumentError(
                "resume", f"is on, but {self.resume_from} was made with different settings ({detail})"
            )
        load_lora_state_dict(self.model, {k: v.to(dd.device) for k, v in ck["lora"].items()})
        self.optimizer.load_state_dict(ck["optimizer"]["adamw"])
        self.scaler.load_state_dict(ck["optimizer"]["scaler"])
        self.start = int(ck["trainer"]["step"])
        self.tokens_seen = int(ck["trainer"]["tokens"])
        set_rng_state(ck["rng"][dd.rank])
        if ck["kernel_pins"] is not None:
            try:
                pins.apply(ck["kernel_pins"])
            except (KernelInputError, KeyError, TypeError) as e:
                raise Phi3FastError(f"{self.resume_from / PINS}: unusable kernel pins: {e}") from e

    # ---- one step, evaluation, checkpoint ---------------------------------------------------------------------

    def _micro_loss(self, rows: list[Row]) -> torch.Tensor:
        """Summed token loss of one micro-batch (fp32, differentiable)."""
        b = collate(rows, self.pad_id)
        to = lambda t: None if t is None else t.to(self.dd.device, non_blocking=True)
        hidden = self.model.hidden_states(to(b.input_ids), to(b.position_ids), to(b.seq_ids))
        with all_threads():  # a few large GEMMs (the lm_head over the chunk's rows): every thread
            return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.model.lm_head.weight,
                                         to(b.labels).reshape(-1), backend=self.cfg.kernels)  # fmt: skip

    def step(self, step: int) -> dict[str, Any]:
        """Optimizer step `step` (0-based) over its global batch; returns the step's metrics."""
        with glue_threads(self.dd.device):
            return self._step(step)

    def _step(self, step: int) -> dict[str, Any]:
        cfg, dd, micro = self.cfg, self.dd, self.cfg.batch_size
        t0 = time.perf_counter()
        batch_rows = [self.rows[i] for i in self.order.rows(step * self.per_step, self.per_step)]
        denom = max(sum(r.n_targets for r in batch_rows), 1)  # of the WHOLE global batch: every rank knows it
        loss_sum = torch.zeros((), dtype=torch.float32, device=dd.device)
        for m in range(cfg.grad_accum):
            j = m * dd.world + dd.rank  # this rank's micro-batch j of the global batch
            loss = self._micro_loss(batch_rows[j * micro : (j + 1) * micro])
            (loss * (self.scaler.scale / denom)).backward()
            loss_sum += loss.detach()
        grads = [p.grad for p in self.params if p.grad is not None]
        distributed.all_reduce_sum_([*grads, loss_sum.view(1)])
        if self.scaler.unscale_and_check(self.params):
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            lr = lr_at(step, cfg, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        else:
            lr = 0.0  # skipped: fp16 overflow, the scale was halved
        self.optimizer.zero_grad(set_to_none=True)
        if dd.device.type == "cuda":
            torch.cuda.synchronize(dd.device)
        dt = time.perf_counter() - t0
        step_tokens = sum(r.n_tokens for r in batch_rows)
        self.tokens_seen += step_tokens
        return {
            "step": step + 1,
            "loss": float(loss_sum) / denom,
            "lr": lr,
            "tokens": self.tokens_seen,
            "tokens_per_s": step_tokens / dt,
            "peak_mem_bytes": int(distributed.max_across(peak_memory_bytes(dd.device), dd.device)),
            "kernels": self.kernels,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over all eval rows (rows sharded across ranks; sums and counts all-reduced)."""
        dd, model = self.dd, self.model
        was_training = model.training
        model.eval()
        mine = self.eval_rows[dd.rank :: dd.world]
        total = torch.zeros(2, dtype=torch.float64, device=dd.device)
        for i in range(0, len(mine), self.cfg.batch_size):
            chunk = mine[i : i + self.cfg.batch_size]
            loss = self._micro_loss(chunk)
            total += torch.tensor(
                [float(loss), sum(r.n_targets for r in chunk)], dtype=torch.float64, device=dd.device
            )
        distributed.all_reduce_sum_([total])
        model.train(was_training)
        return float(total[0] / total[1].clamp_min(1))

    def save_checkpoint(self, step: int) -> Path | None:
        """checkpoints/step-N on rank 0 (with every rank's RNG state, so each resumes its own dropout)."""
        path = None
        rngs = distributed.all_gather_object(rng_state())
        if self.dd.main:
            trainer = {
                "fingerprint": self.fingerprint(),
                "tokens": self.tokens_seen,
                "config": asdict(self.cfg),
            }
            optim = {"adamw": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
            path = save_checkpoint(self.ckpt_root, step, lora_state_dict(self.model), optim, trainer, rngs,
                                   kernel_pins=pins.snapshot())  # fmt: skip
        distributed.barrier()
        return path

    # ---- the run -------------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self._setup_inputs()
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()
        self._resume()
        cfg, dd = self.cfg, self.dd
        log = MetricsLog(self.out, self.start) if dd.main else None
        if dd.main and (self.stats.truncated or self.stats.dropped):
            print(f"note: of the samples longer than seq_len {cfg.seq_len}, {self.stats.truncated} were truncated "
                  f"and {self.stats.dropped} (nothing to learn left) were skipped", file=sys.stderr)  # fmt: skip
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.start, disable=not (dd.main and cfg.progress), unit="step",
                   dynamic_ncols=True)  # fmt: skip
        losses: list[float] = []
        loss_value = float("nan")
        step = self.start
        with _Signals() as signals:
            while step < self.total_steps:
                metrics = self.step(step)
                step += 1
                loss_value = metrics["loss"]
                losses.append(loss_value)
                if self.eval_rows and (
                    (cfg.eval_every and step % cfg.eval_every == 0) or step == self.total_steps
                ):
                    metrics["eval_loss"] = self.evaluate()
                    metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50.0))
                if log is not None:
                    log.write(metrics)
                bar.update(1)
                postfix = {"loss": f"{loss_value:.4f}", "tok/s": f"{metrics['tokens_per_s']:.0f}",
                           "mem": f"{metrics['peak_mem_bytes'] / 2**30:.2f}G"}  # fmt: skip
                bar.set_postfix(ordered_dict=postfix)  # tqdm adds the ETA
                if self.on_step is not None:
                    self.on_step(step, metrics)
                stop = distributed.any_rank(signals.caught is not None, dd.device)
                if stop or (cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps):
                    self.last_ckpt = self.save_checkpoint(step)
                if stop:
                    bar.close()
                    if log is not None:
                        log.plot(self.out)
                    return TrainResult(step, loss_value, self.out, None, self.last_ckpt,
                                       signals.caught or "SIGTERM", losses)  # fmt: skip
        bar.close()
        adapter = None
        if dd.main:
            save_adapter(self.model, self.out)
            log.plot(self.out)
            adapter = self.out
        distributed.barrier()
        return TrainResult(step, loss_value, self.out, adapter, self.last_ckpt, None, losses)


def train(cfg: TrainConfig, on_step: StepCallback | None = None) -> TrainResult:
    """Run (or resume) a LoRA/QLoRA fine-tune; returns when done or after a SIGINT/SIGTERM checkpoint.

    on_step(step, metrics) is called on every rank after each optimizer step (tests use it to interrupt a run).
    """
    dd = distributed.init()
    try:
        return Trainer(cfg, dd, on_step).run()
    finally:
        distributed.shutdown()
