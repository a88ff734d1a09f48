"""`phi3fast info`: versions, devices and the SIMD level of this machine."""

from __future__ import annotations

import click

from phi3fast.cli.app import main, user_errors


@main.command()
@user_errors
def info() -> None:
    """Show versions, devices and the SIMD level the native index will use."""
    from phi3fast.sysinfo import system_info

    for key, value in system_info().items():
        click.echo(f"{key:>12}: {value}")
