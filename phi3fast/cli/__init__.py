"""The `phi3fast` command line: the group (app.py) and one module per verb family, registered by importing it.

Each verb only parses arguments and calls a library function.
"""

from phi3fast.cli import info, interop, model, rag, serve, train  # noqa: F401  (each registers its verbs on `main`)
from phi3fast.cli.app import main, user_errors

__all__ = ["main", "user_errors"]
