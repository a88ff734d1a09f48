"""phi3fast: fast, lean QLoRA fine-tuning and RAG for Microsoft Phi-3."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("phi3fast")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
