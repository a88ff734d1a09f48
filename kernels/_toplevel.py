"""Note: the `kernels` name. This folder installs as `phi3fast.kernels`, but with the repository root on sys.path
(`python -c`, a notebook or a REPL started there) Python would also find it as a top-level package `kernels`,
shadowing the PyPI package of that name that transformers, PEFT and bitsandbytes import. The folder must keep its
place (the design puts Triton kernels at the top), so when it is imported under the top-level name, its
`__init__` hands the import over to the installed package found on the rest of sys.path.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_repo_root(entry: str) -> bool:
    try:
        return os.path.samefile(entry or os.getcwd(), _REPO_ROOT)
    except OSError:
        return False


def installed_kernels() -> ModuleType:
    """Load and return the `kernels` package installed elsewhere on sys.path, registered as sys.modules['kernels']."""
    path = [p for p in sys.path if not _is_repo_root(p)]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is phi3fast.kernels, not the PyPI package)",
            name="kernels",
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
    return module
