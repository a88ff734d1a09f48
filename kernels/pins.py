"""Pinned launch choices: the autotuned GEMM tile configs and the large-M path (fused vs dequant + cuBLAS).

On a GPU both are chosen by timing on first use, and a different tile config or path sums the K dimension in a
different order, so a resumed run could round differently from the run it continues. A training checkpoint
records the choices made so far (`snapshot()`, written as kernel_pins.json) and a resume reinstalls them
(`apply()`) before the first step: each shape then runs the config it ran before. On CPU nothing is chosen by
timing and the snapshot is empty.

Format (JSON): {"version": 1, "autotune": {kernel: [{"key": [...], "config": {"kwargs": {...}, "num_warps": w,
"num_stages": s}}]}, "large_m": [{"key": [...], "path": "fused" | "dequant"}]}. Keys are the autotuner's own
(its key arguments, then the dtypes of the tensor arguments) and large_m_path's, as lists.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import lora, nf4
from .backend import KernelInputError

VERSION = 1
AUTOTUNED = {"nf4_matmul": nf4._nf4_matmul_kernel, "lora_dx": lora._lora_dx_kernel}


def _config_dict(c) -> dict[str, Any]:
    return {"kwargs": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages}


def snapshot() -> dict[str, Any]:
    """Every choice made in this process so far, JSON-serializable."""
    tuned = {
        name: [{"key": list(key), "config": _config_dict(c)} for key, c in kernel.cache.items()]
        for name, kernel in AUTOTUNED.items()
    }
    paths = [{"key": list(key), "path": path} for key, path in nf4._LARGE_M_CHOICE.items()]
    return {"version": VERSION, "autotune": tuned, "large_m": paths}


def apply(pins: dict[str, Any]) -> int:
    """Install a snapshot's choices into the autotuners' caches and the large-M table; returns how many.

    A pinned config that is not among this build's configs (the pins come from another version) is skipped
    with a warning: running a config the build no longer lists could spill or fail to compile."""
    if pins.get("version") != VERSION:
        raise KernelInputError(f"kernel pins version {pins.get('version')!r}, expected {VERSION}")
    applied = 0
    for name, entries in pins.get("autotune", {}).items():
        kernel = AUTOTUNED.get(name)
        if kernel is None:
            warnings.warn(f"kernel pins: unknown kernel {name!r} skipped", stacklevel=2)
            continue
        for entry in entries:
            config = next((c for c in kernel.configs if _config_dict(c) == entry["config"]), None)
            if config is None:
                warnings.warn(f"kernel pins: {name} config {entry['config']} is not in this build; the shape "
                              "will be tuned again", stacklevel=2)  # fmt: skip
                continue
            kernel.cache[tuple(entry["key"])] = config
            applied += 1
    for entry in pins.get("large_m", []):
        if entry["path"] not in ("fused", "dequant"):
            raise KernelInputError(f"kernel pins: large-M path {entry['path']!r}, expected fused or dequant")
        nf4._LARGE_M_CHOICE[tuple(entry["key"])] = entry["path"]
        applied += 1
    return applied
