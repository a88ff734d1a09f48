"""Data parallel: torchrun with 2 gloo processes == one process with --grad-accum 2 (losses and the adapter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phi3fast.train import TrainConfig, train

DATA = Path(__file__).parent / "data" / "train_memorize.jsonl"
ROOT = Path(__file__).resolve().parents[1]
OPTS = dict(max_steps=4, batch_size=2, seq_len=64, lr=5e-3, warmup=2, rank=4, alpha=8, dropout=0.0, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from phi3fast.model.tiny import init_tiny

    return init_tiny(
        tmp_path_factory.mktemp("tiny") / "m", hidden=64, layers=2, heads=4, intermediate=128, vocab=512
    )


@pytest.mark.parametrize("packing", [True])
def test_two_gloo_processes_equal_grad_accum_2(tiny, tmp_path, packing):
    ddp_out, one_out = tmp_path / "ddp", tmp_path / "one"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in OPTS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "phi3fast", "train", "--model", str(tiny), "--data", str(DATA), "--out", str(ddp_out),
           "--dtype", "fp32", "--save-every", "2", "--no-progress", "--eval-data", str(DATA), "--eval-every", "2", *args, *(["--packing"] if packing else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(TrainConfig(model=str(tiny), data=str(DATA), out=str(one_out), dtype="fp32", save_every=0,
                                grad_accum=2, packing=packing, progress=False, eval_data=str(DATA), eval_every=2,
                                **OPTS))  # fmt: skip
    finally:
        torch.set_num_threads(old)

    rows = [json.loads(line) for line in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone writes, once per step
    ddp_losses = [r["loss"] for r in rows]
    assert ddp_losses == pytest.approx(one.losses, rel=1e-5)
    # Eval rows are sharded across the ranks; the all-reduced mean is the single process's.
    one_rows = [json.loads(line) for line in (one_out / "metrics.jsonl").read_text().splitlines()]
    ddp_eval = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    one_eval = {r["step"]: r["eval_loss"] for r in one_rows if "eval_loss" in r}
    assert ddp_eval.keys() == one_eval.keys() == {2, 4}
    assert list(ddp_eval.values()) == pytest.approx(list(one_eval.values()), rel=1e-5)
    # Same global batch per step: the token counts agree exactly.
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in one_rows]
    # The gradients (all-reduced sums) drove the same updates: the trained adapters agree.
    a = load_file(str(ddp_out / "adapter_model.safetensors"))
    b = load_file(str(one_out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert (ddp_out / "checkpoints" / "step-2" / "manifest.json").exists()


def test_two_process_resume_restores_each_ranks_dropout(tiny, tmp_path):
    """With dropout on, each rank draws its own masks: a resumed 2-process run must restore every rank's RNG
    (and the rest) to reproduce the uninterrupted run's steps exactly."""
    out = tmp_path / "ddp"
    opts = {**OPTS, "dropout": 0.1}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "phi3fast", "train", "--model", str(tiny), "--data", str(DATA), "--out", str(out),
           "--dtype", "fp32", "--save-every", "2", "--no-progress", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    straight = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Resume the finished run from its step-2 checkpoint: steps 3 and 4 are recomputed.
    again = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(straight) == len(resumed) == 4
    assert resumed == straight  # exact
