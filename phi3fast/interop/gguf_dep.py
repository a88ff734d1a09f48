"""The optional `gguf` package (pip install 'phi3fast[gguf]'), imported only where a GGUF file is read or written."""

from __future__ import annotations

from types import ModuleType

from phi3fast.errors import Phi3FastError


def require_gguf(what: str) -> ModuleType:
    """The gguf module, or one clear error naming the extra that installs it."""
    try:
        import gguf
    except ImportError:
        raise Phi3FastError(f"{what} needs the 'gguf' package: pip install 'phi3fast[gguf]'") from None
    return gguf
