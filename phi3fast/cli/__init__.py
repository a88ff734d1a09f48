"""The `phi3fast` command line. Each verb only parses arguments and calls a library function.

Verbs live in one module per area (phi3fast/cli/<area>.py), each decorating functions with `@main.command()`;
the imports at the bottom of this file register them. Register a verb only once it works.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from phi3fast import __version__
from phi3fast.errors import Phi3FastError


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a Phi3FastError (bad input) into one clear line on stderr and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Phi3FastError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="phi3fast")
def main() -> None:
    """phi3fast: fast, lean QLoRA fine-tuning and RAG for Microsoft Phi-3."""
    # When bitsandbytes is installed (a test extra), sentence-transformers -> transformers -> peft imports it, and
    # on AVX512-BF16 CPUs it warns that it cannot fetch an optional kernel from the Hub. phi3fast never runs
    # bitsandbytes code, so that warning is noise on every verb.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@main.command()
@user_errors
def info() -> None:
    """Show versions, devices and the SIMD level the native index will use."""
    from phi3fast.sysinfo import system_info

    for key, value in system_info().items():
        click.echo(f"{key:>12}: {value}")


# Verb modules register themselves on `main` when imported (one line per area).
from phi3fast.cli import (  # noqa: E402,F401  (init-tiny/generate/merge, index/query, train)
    eval,  # noqa: E402,F401  (eval, rag-data)
    interop,  # noqa: E402,F401  (convert, export)
    model,
    rag,
    train,
)
