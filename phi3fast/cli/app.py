"""The `phi3fast` command group and the one place user errors become one line on stderr.

Verbs live in one module per family (phi3fast/cli/<family>.py), each decorating functions with
`@main.command()` and `@user_errors`; phi3fast/cli/__init__.py imports them so they register. Register a verb
only once it works.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from phi3fast import __version__
from phi3fast.errors import ArgumentError, Phi3FastError


def _is_user_error(e: BaseException) -> bool:
    """phi3fast's errors, and the kernels' input errors (a module that was never imported raised none)."""
    if isinstance(e, Phi3FastError):
        return True
    backend = sys.modules.get("phi3fast.kernels.backend")
    return backend is not None and isinstance(e, backend.KernelInputError)


def _message(e: BaseException) -> str:
    """The error's text, an ArgumentError's argument said as this command's flag (batch_size -> --batch-size)."""
    if isinstance(e, ArgumentError):
        ctx = click.get_current_context(silent=True)
        for param in ctx.command.params if ctx is not None else ():
            if param.name == e.argument and isinstance(param, click.Option):
                flag = max(param.opts, key=len)
                return f"{flag} {e.problem}"
    return str(e)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user error (bad input) into one clear line on stderr and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:
            if not _is_user_error(e):
                raise
            click.echo(f"error: {_message(e)}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="phi3fast")
def main() -> None:
    """phi3fast: fast, lean QLoRA fine-tuning and RAG for Microsoft Phi-3."""
    # When bitsandbytes is installed (a test extra), sentence-transformers -> transformers -> peft imports it, and
    # on AVX512-BF16 CPUs it warns that it cannot fetch an optional kernel from the Hub. phi3fast never runs
    # bitsandbytes code, so that warning is noise on every verb.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
