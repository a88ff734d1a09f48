"""The training loop on a tiny Phi-3: memorization, accumulation == one batch, resume equivalence, signals, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from phi3fast.errors import Phi3FastError
from phi3fast.train import TrainConfig, train
from phi3fast.training.checkpoint import latest_checkpoint, verify
from phi3fast.training.data import DataOrder
from phi3fast.training.precision import LossScaler, resolve_dtype
from phi3fast.training.trainer import lr_at

DATA = Path(__file__).parent / "data"
MEMORIZE = DATA / "train_memorize.jsonl"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from phi3fast.model.tiny import init_tiny

    return init_tiny(
        tmp_path_factory.mktemp("tiny") / "m", hidden=64, layers=2, heads=4, intermediate=128, vocab=512
    )


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids oversubscribing the 2 cores other test files share."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def config(tiny: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(tiny), data=str(MEMORIZE), out=str(out), max_steps=6, batch_size=2, grad_accum=1,
        seq_len=64, lr=5e-3, warmup=2, rank=4, alpha=8, dropout=0.0, save_every=0, dtype="fp32",
        progress=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_memorization_set(tiny, tmp_path):
    """40 steps over 6 rows (QLoRA, auto dtype = bf16 here, packing): the loss must fall well below its start."""
    cfg = config(tiny, tmp_path, max_steps=40, batch_size=3, seq_len=128, lr=1e-2, warmup=4, rank=8, alpha=16,
                 dtype="auto", packing=True, eval_data=str(MEMORIZE), eval_every=20)  # fmt: skip
    res = train(cfg)
    rows = metrics(tmp_path)
    assert res.steps == 40 and len(rows) == 40 and res.interrupted is None
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert first > 5.0  # ~ln(512): the random model knows nothing
    assert last < 0.35 * first, (first, last)
    for r in rows:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "peak_mem_bytes"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert math.isclose(evals[-1]["eval_ppl"], math.exp(evals[-1]["eval_loss"]), rel_tol=1e-9)
    assert rows[3]["lr"] == pytest.approx(1e-2) and rows[-1]["lr"] < 1e-4  # warmup peak, cosine end
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()


def test_adapter_reloads_to_the_trained_model(tiny, tmp_path):
    from phi3fast.model import load

    res = train(config(tiny, tmp_path, max_steps=3, quantize="none"))
    trained = load(tiny, adapter=res.adapter, quantize=None, dtype=torch.float32)
    base = load(tiny, quantize=None, dtype=torch.float32)
    ids = torch.tensor([[5, 9, 33, 70, 101]])
    with torch.no_grad():
        assert not torch.allclose(trained(ids), base(ids), atol=1e-4)  # the adapter changed the model


@pytest.mark.parametrize("packing", [False, True])
def test_grad_accum_equals_one_big_batch(tiny, tmp_path, packing):
    """batch 4 x accum 1 == batch 2 x accum 2 == batch 1 x accum 4: same rows per step, loss normalized by the
    whole step's token count, so the same losses and updates up to fp32 rounding."""
    runs = []
    for b, a in [(4, 1), (2, 2), (1, 4)]:
        res = train(config(tiny, tmp_path / f"{b}x{a}", batch_size=b, grad_accum=a, max_steps=4, packing=packing,
                           seq_len=64))  # fmt: skip
        runs.append(res.losses)
    for other in runs[1:]:
        assert other == pytest.approx(runs[0], rel=2e-5, abs=1e-6)
    assert runs[0][-1] < runs[0][0]


def test_gradient_checkpointing_changes_nothing_but_memory(tiny, tmp_path):
    plain = train(config(tiny, tmp_path / "plain", max_steps=3))
    ckpt = train(config(tiny, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True))
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)


def test_data_order_is_seeded_epochs_of_permutations():
    a = DataOrder(6, seed=1)
    two_epochs = a.rows(0, 12)
    assert sorted(two_epochs[:6]) == list(range(6)) and sorted(two_epochs[6:]) == list(range(6))
    assert two_epochs[:6] != two_epochs[6:]  # reshuffled per epoch
    assert DataOrder(6, seed=1).rows(4, 5) == two_epochs[4:9]  # a pure function of the position (resume)
    assert DataOrder(6, seed=2).rows(0, 6) != two_epochs[:6]


def test_epochs_set_the_step_count(tiny, tmp_path):
    res = train(config(tiny, tmp_path, max_steps=None, epochs=1.5, batch_size=2, grad_accum=2))
    assert res.steps == 3  # ceil(1.5 * 6 rows / 4 rows per step)


def test_resume_reproduces_the_uninterrupted_run(tiny, tmp_path):
    """N steps straight == k steps, SIGTERM (checkpoint), --resume to N: identical per-step losses, with dropout
    on (RNG state), grad accumulation, warmup + cosine (scheduler) and AdamW moments (optimizer)."""
    kw = dict(max_steps=6, grad_accum=2, dropout=0.1, save_every=2)
    full = train(config(tiny, tmp_path / "full", **kw))

    out = tmp_path / "split"

    def stop_at_3(step: int, _: dict) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler turns this into a checkpoint + return

    first = train(config(tiny, out, **kw), on_step=stop_at_3)
    assert first.interrupted == "SIGTERM" and first.steps == 3 and first.adapter is None
    assert first.checkpoint == out / "checkpoints" / "step-3" and verify(first.checkpoint) is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    second = train(config(tiny, out, resume=True, **kw))
    assert second.steps == 6
    assert first.losses + second.losses == full.losses  # exact, not approximate
    assert [r["loss"] for r in metrics(out)] == full.losses
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))


def test_resume_skips_a_damaged_checkpoint_and_refuses_other_settings(tiny, tmp_path):
    cfg = config(tiny, tmp_path, max_steps=4, save_every=1)
    train(cfg)
    ckpts = tmp_path / "checkpoints"
    assert latest_checkpoint(ckpts) == ckpts / "step-3"  # the final step is the adapter, not a checkpoint
    with pytest.raises(Phi3FastError, match="^resume is off, but .* holds checkpoints of an earlier run"):
        train(cfg)  # a fresh run would mix with the old run's checkpoints
    blob = ckpts / "step-3" / "optimizer.pt"
    blob.write_bytes(blob.read_bytes()[:-7])  # torn write
    (ckpts / "step-9").mkdir()  # a directory without a manifest is not a checkpoint
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert latest_checkpoint(ckpts) == ckpts / "step-2"
    with pytest.raises(Phi3FastError, match=r"made with different settings \(batch_size: 2 -> 3"):
        with pytest.warns(UserWarning):
            train(replace(cfg, resume=True, batch_size=3))


def test_bad_row_is_reported_before_training(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(Phi3FastError, match=rf"^{bad}:2: 'messages' has no assistant turn"):
        train(config(tiny, tmp_path / "out", data=str(bad)))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_fp16_with_loss_scaling_tracks_fp32(tiny, tmp_path):
    """fp16 compute with a 2^16 loss scale: no step skipped, and the same losses as fp32 to fp16 precision."""
    kw = dict(max_steps=4, batch_size=6, quantize="none")
    ref = train(config(tiny, tmp_path / "fp32", **kw))
    half = train(config(tiny, tmp_path / "fp16", dtype="fp16", **kw))
    assert all(r["lr"] > 0 for r in metrics(tmp_path / "fp16"))  # lr 0 marks an overflow-skipped step
    assert half.losses == pytest.approx(ref.losses, rel=5e-3)
    assert half.losses[-1] < half.losses[0]


def test_loss_scaler_skips_overflow_and_halves():
    p = torch.nn.Parameter(torch.zeros(3))
    s = LossScaler(enabled=True, scale=8.0, interval=2)
    p.grad = torch.tensor([8.0, 16.0, 24.0])
    assert s.unscale_and_check([p]) and torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    p.grad = torch.tensor([float("inf"), 0.0, 0.0])
    assert not s.unscale_and_check([p]) and s.scale == 4.0
    for _ in range(2):
        p.grad = torch.ones(3)
        assert s.unscale_and_check([p])
    assert s.scale == 8.0


def test_schedule_and_dtype_choice(monkeypatch):
    cfg = TrainConfig(model="m", data="d", out="o", lr=1.0, warmup=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lr_at(20, cfg, 20) == pytest.approx(0.1)
    import phi3fast.training.precision as t

    monkeypatch.setattr(t, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(t, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"batch_size": 0}, "^batch_size must be >= 1"),
        ({"quantize": "int8"}, "^quantize"),
        ({"dtype": "fp8"}, "^dtype"),
        ({"target_modules": ("q_proj",)}, "unknown ['q_proj']"),
        ({"dropout": 1.0}, "^dropout"),
    ],
)
def test_config_errors(kw, message):
    with pytest.raises(Phi3FastError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig(model="m", data="d", out="o", **kw)


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "phi3fast", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


def test_cli_sigterm_saves_a_checkpoint_that_resumes(tiny, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(tiny), "--data", str(MEMORIZE), "--out", str(out), "--max-steps", "100000",
            "--batch-size", "2", "--seq-len", "64", "--save-every", "0", "--dtype", "fp32", "--no-progress",
            "--lr", "5e-3", "--warmup", "2", "--rank", "4", "--alpha", "8", "--dropout", "0"]  # fmt: skip
    proc = _cli(*args)
    log = out / "metrics.jsonl"
    # Wait for two logged steps (the signal must land mid-training, not while the model loads); the bound only
    # keeps a hung run from hanging the suite, so it is generous for a loaded machine.
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None and len(log.read_text().splitlines()) >= 2, "training did not reach step 2"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM: stopped after step" in err
    stopped = len(metrics(out))
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt == out / "checkpoints" / f"step-{stopped}" and verify(ckpt) is None

    # --resume picks it up: the next logged step is the one after the checkpoint.
    def stop_now(step: int, _: dict) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C takes the same path

    cfg = config(tiny, out, max_steps=100000, resume=True)
    res = train(cfg, on_step=stop_now)
    assert (
        res.interrupted == "SIGINT"
        and res.steps == stopped + 1
        and [r["step"] for r in metrics(out)] == list(range(1, stopped + 2))
    )


def test_cli_bad_row_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"prompt": "p", "completion": 5}\n')
    proc = _cli("--model", str(tmp_path / "no-model"), "--data", str(bad), "--out", str(tmp_path / "o"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip() == f"error: {bad}:3: 'completion' must be a string, got int"


def test_cli_says_config_errors_with_its_flags(tmp_path):
    from click.testing import CliRunner

    from phi3fast.cli import main

    args = ["train", "--model", "m", "--data", str(MEMORIZE), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(main, [*args, "--batch-size", "0"])
    assert res.exit_code == 2 and res.output.strip() == "error: --batch-size must be >= 1"
    res = CliRunner().invoke(main, [*args, "--target-modules", "q_proj"])
    assert res.exit_code == 2 and res.output.startswith("error: --target-modules has unknown ['q_proj']")
