"""Pinned launch choices (phi3fast.kernels.pins): a snapshot of the autotuned configs and large-M paths goes into
the training checkpoint and is installed again on resume, so the resumed run uses the configs it used before.

On CPU nothing is chosen by timing, so the tests make the choices themselves: the interpreter's autotuner gets two
configs and a fixed 'timing', and the large-M table gets an entry, as a GPU run would."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import pytest
import torch
from phi3fast.kernels import nf4, nf4_matmul, pins
from test_kernels_gemm_offsets import _two_tile_widths
from test_kernels_nf4 import assert_close, bnb_weight
from test_train import config, one_thread, tiny  # noqa: F401 (fixtures)

from phi3fast.errors import Phi3FastError
from phi3fast.train import train
from phi3fast.training.checkpoint import PINS, latest_checkpoint


def stop_at(step: int):
    """on_step callback: SIGTERM at `step`, which the loop turns into a checkpoint and a clean return."""

    def hook(s: int, _: dict) -> None:
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


@pytest.fixture
def clean_choices(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(nf4, "_LARGE_M_CHOICE", {})
    _two_tile_widths(nf4._nf4_matmul_kernel, monkeypatch)
    monkeypatch.setattr(pins.AUTOTUNED["lora_dx"], "cache", {})


def test_snapshot_apply_round_trip_skips_tuning(clean_choices, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = nf4._nf4_matmul_kernel
    w, _, _ = bnb_weight(64, 128)
    x = torch.randn(24, 128)
    nf4_matmul(x, w, backend="triton")  # tunes: the fixed timing picks BLOCK_K=64
    snap = json.loads(json.dumps(pins.snapshot()))  # what the checkpoint file holds
    (entry,) = snap["autotune"]["nf4_matmul"]
    assert entry["config"]["kwargs"]["BLOCK_K"] == 64

    kernel.cache.clear()
    monkeypatch.setattr(kernel, "_bench", lambda *a, **kw: pytest.fail("a pinned shape was tuned again"))
    assert pins.apply(snap) == 1
    out = nf4_matmul(x, w, backend="triton")
    assert kernel.best_config.kwargs["BLOCK_K"] == 64
    assert_close(out, x @ nf4.nf4_dequantize(w, torch.float32, backend="torch").t(), torch.float32)


def test_unknown_config_is_skipped_and_bad_pins_refused(clean_choices) -> None:
    snap = {"version": 1, "autotune": {"nf4_matmul": [{"key": [32, 64, 128, False, 64], "config": {
        "kwargs": {"BLOCK_M": 256}, "num_warps": 4, "num_stages": 1}}]}, "large_m": []}  # fmt: skip
    with pytest.warns(UserWarning, match="not in this build"):
        assert pins.apply(snap) == 0
    with pytest.raises(ValueError, match="version"):
        pins.apply({"version": 99})
    with pytest.raises(ValueError, match="large-M path 'cublas'"):
        pins.apply({"version": 1, "large_m": [{"key": ["fwd"], "path": "cublas"}]})


def test_checkpoint_records_choices_and_resume_reinstalls_them(tiny, tmp_path, clean_choices) -> None:  # noqa: F811
    """A run saves kernel_pins.json with its checkpoint; a resume (in a process whose choices are gone) reads it
    and the autotuner's cache and the large-M table hold the same choices again before training continues."""
    kernel = nf4._nf4_matmul_kernel
    tuned_key = (32, 3072, 3072, True, 64, "torch.bfloat16")
    kernel.cache[tuned_key] = kernel.configs[1]
    path_key = ("fwd", 64, 3072, 3072, "torch.bfloat16", True, True)
    nf4._LARGE_M_CHOICE[path_key] = "dequant"
    cfg = config(tiny, tmp_path, max_steps=4, save_every=2)
    train(cfg, on_step=stop_at(3))
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    saved = json.loads((ckpt / PINS).read_text())
    assert saved["large_m"] == [{"key": list(path_key), "path": "dequant"}]
    assert saved["autotune"]["nf4_matmul"][0]["key"] == list(tuned_key)

    kernel.cache.clear()
    nf4._LARGE_M_CHOICE.clear()
    assert train(replace(cfg, resume=True)).steps == 4
    assert nf4._LARGE_M_CHOICE[path_key] == "dequant"
    assert kernel.cache[tuned_key] is kernel.configs[1]


def test_resume_with_damaged_pins_names_the_file(tiny, tmp_path, clean_choices) -> None:  # noqa: F811
    """Pins that parse but make no sense (hand-edited, with the manifest rewritten) stop the resume with the path."""
    from phi3fast.training import checkpoint

    cfg = config(tiny, tmp_path, max_steps=4, save_every=2)
    train(cfg, on_step=stop_at(3))
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    (ckpt / PINS).write_text(json.dumps({"version": 7}))
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    manifest["files"][PINS] = {
        "bytes": (ckpt / PINS).stat().st_size,
        "sha256": checkpoint._sha256(ckpt / PINS),
    }
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(Phi3FastError, match=rf"{PINS}: unusable kernel pins: kernel pins version 7"):
        train(replace(cfg, resume=True))
