"""Training checkpoints: checkpoints/step-N/ written atomically, found and verified on resume.

A checkpoint holds everything the next step depends on: LoRA weights, AdamW state, loss-scale state, the RNG
states (python, numpy, torch, cuda) and the data-order position (the global step; the order itself is a pure
function of the seed). It is written into a temporary directory and renamed into place, and its manifest (file
sizes and sha256) is written last inside it, so a directory named step-N is complete by construction and a
damaged one is detected rather than half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from phi3fast._utils import fsync
from phi3fast.errors import Phi3FastError

MANIFEST = "manifest.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (dropout uses torch's; data order uses none of them)."""
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    lora: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    trainer: dict[str, Any],
    rng_states: list[dict[str, Any]],
) -> Path:
    """Write root/step-{step}/ atomically: lora.safetensors, optimizer.pt, rng.pt, trainer.json, manifest.json.

    rng_states holds one rng_state() per rank (each rank draws its own dropout masks)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(rng_states, tmp / "rng.pt")
    trainer = {**trainer, "step": step}
    (tmp / "trainer.json").write_text(json.dumps(trainer))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    for p in tmp.iterdir():  # data on disk before the rename makes the checkpoint visible
        fsync(p)
    if final.exists():  # re-saving the same step (e.g. interrupted right after a periodic save)
        old = root / f".old-step-{step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def verify(path: Path) -> str | None:
    """None if path is a complete, undamaged checkpoint; else why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no valid {MANIFEST} ({e.__class__.__name__})"
    if manifest.get("format") != FORMAT:
        return f"checkpoint format {manifest.get('format')}, expected {FORMAT}"
    for name in ("lora.safetensors", "optimizer.pt", "rng.pt", "trainer.json"):
        if name not in files:
            return f"manifest lacks {name}"
    for name, meta in files.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            return f"{name} is damaged (size or sha256 differs from the manifest)"
    return None


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """step-N directories under root, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint; damaged or incomplete ones are skipped with a warning naming them."""
    for _, path in checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a verified checkpoint: {'lora', 'optimizer', 'trainer', 'rng' (a list, one state per rank)}."""
    problem = verify(path)
    if problem is not None:
        raise Phi3FastError(f"{path}: not a usable checkpoint: {problem}")
    trainer = json.loads((path / "trainer.json").read_text())
    rng = torch.load(path / "rng.pt", weights_only=True)
    return {
        "lora": load_file(str(path / "lora.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "trainer": trainer,
        "rng": rng,
    }
