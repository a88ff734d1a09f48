"""What this machine offers phi3fast: library versions, devices, SIMD. Used by `phi3fast info` and bench rows."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@lru_cache(maxsize=1)
def git_revision() -> str:
    """Short git revision of the source tree, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu:{platform.processor() or platform.machine()}"


def system_info() -> dict[str, str]:
    import torch

    from phi3fast import __version__, _hnsw

    return {
        "phi3fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _pkg_version("triton"),
        "transformers": _pkg_version("transformers"),
        "device": device_name(),
        "cuda": "available" if torch.cuda.is_available() else "not available (torch reference ops)",
        "simd": _hnsw.simd_level(),
        "git": git_revision(),
    }
