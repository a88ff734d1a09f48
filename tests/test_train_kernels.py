"""Training with the fused kernels gives the reference path's losses: a tiny Phi-3, 30 QLoRA steps,
`kernels='triton'` (RMSNorm, RoPE, SwiGLU and cross-entropy in Triton's interpreter) vs `kernels='torch'`."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from test_train import one_thread  # noqa: F401  (autouse: one intra-op thread, as in test_train.py)

from phi3fast.errors import Phi3FastError
from phi3fast.train import TrainConfig, train

# Modules by name: the package's `swiglu` attribute is the op, which shadows the module of the same name.
cross_entropy, rmsnorm, rope, swiglu = (
    importlib.import_module(f"phi3fast.kernels.{m}") for m in ("cross_entropy", "rmsnorm", "rope", "swiglu")
)

MEMORIZE = Path(__file__).parent / "data" / "train_memorize.jsonl"
# The Triton launchers of the four fused kernels; each call is counted to prove which path ran.
LAUNCHERS = [(rmsnorm, "forward_triton"), (rmsnorm, "backward_triton"), (rope, "rotate_triton_"),
             (swiglu, "forward_triton"), (swiglu, "backward_triton"), (cross_entropy, "ce_rows_triton")]  # fmt: skip
# Per-step relative loss difference allowed between the backends. Measured on this run: <= 5.5e-7 (the row
# kernels reduce in another order and round exp/rsqrt differently, and 30 steps of updates carry it on), i.e.
# a few fp32 ulps; 1e-5 leaves ~20x for other CPUs' exp/log, while a wrong sign, scale or index is far above.
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from phi3fast.model.tiny import init_tiny

    # One layer and 16-token rows: the interpreter runs one Python program per row and kernel, so this keeps
    # 30 steps near 30 s on 2 busy cores while every kernel still runs forward and backward.
    return init_tiny(
        tmp_path_factory.mktemp("tiny") / "m", hidden=64, layers=1, heads=4, intermediate=128, vocab=512
    )


def config(tiny: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model=str(tiny), data=str(MEMORIZE), out=str(out), max_steps=30, batch_size=1, seq_len=16,
                lr=1e-2, warmup=3, rank=4, alpha=8, dropout=0.05, save_every=0, dtype="fp32", progress=False)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def counted(monkeypatch) -> dict[str, int]:
    calls = {f"{m.__name__}.{name}": 0 for m, name in LAUNCHERS}
    for module, name in LAUNCHERS:
        fn, key = getattr(module, name), f"{module.__name__}.{name}"

        def spy(*args, _fn=fn, _key=key, **kw):
            calls[_key] += 1
            return _fn(*args, **kw)

        monkeypatch.setattr(module, name, spy)
    return calls


def test_triton_kernels_train_like_the_reference(tiny, tmp_path, monkeypatch):
    calls = counted(monkeypatch)
    ref = train(config(tiny, tmp_path / "torch", kernels="torch"))
    assert not any(calls.values()), calls  # the reference run never touches Triton
    fused = train(config(tiny, tmp_path / "triton", kernels="triton"))
    assert all(calls.values()), calls  # every fused kernel ran, forward and backward

    assert len(fused.losses) == len(ref.losses) == 30
    worst = max(abs(a - b) / abs(b) for a, b in zip(fused.losses, ref.losses, strict=True))
    assert worst < REL_TOL, (worst, fused.losses, ref.losses)
    # It trained (so 30 steps of updates carry any difference forward): the last 5 losses well below the first 5.
    assert sum(ref.losses[-5:]) < 0.6 * sum(ref.losses[:5])
    rows = (tmp_path / "triton" / "metrics.jsonl").read_text().splitlines()
    assert all('"kernels": "triton"' in r for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only errors of --kernels triton")
def test_kernels_option_is_checked_before_loading(tiny, tmp_path, monkeypatch):
    with pytest.raises(Phi3FastError, match="^kernels must be auto, triton or torch"):
        config(tiny, tmp_path, kernels="cuda")
    no_model = str(tmp_path / "no-model")  # the errors come before the model is looked for
    with pytest.raises(Phi3FastError, match=r"^kernels triton: .*cannot compute in bf16"):
        train(config(tiny, tmp_path / "a", model=no_model, kernels="triton", dtype="bf16"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(Phi3FastError, match="^kernels triton: backend='triton' on a cpu tensor needs"):
        train(config(tiny, tmp_path / "b", model=no_model, kernels="triton"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error of --kernels triton")
def test_cli_kernels_option(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from phi3fast.cli import main

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = ["train", "--model", str(tmp_path / "m"), "--data", str(MEMORIZE), "--out", str(tmp_path / "o"),
            "--dtype", "fp32"]  # fmt: skip
    res = CliRunner().invoke(main, [*args, "--kernels", "triton"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [
        "error: --kernels triton: backend='triton' on a cpu tensor needs Triton's interpreter: set "
        "TRITON_INTERPRET=1 before phi3fast.kernels is imported, or use backend='auto'"
    ]
    bad = CliRunner().invoke(main, [*args, "--kernels", "cuda"])
    assert bad.exit_code == 2 and "'cuda' is not one of 'auto', 'triton', 'torch'" in bad.output
