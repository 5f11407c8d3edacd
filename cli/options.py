"""What the command modules share: the console and the options that name a run config."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click
import typer
from rich.console import Console

console = Console(width=None if sys.stdout.isatty() else 140)  # logs and pipes get whole tables

CONFIG_OPTION = typer.Option(
    None, help="TOML file with [world], [model], [conversion], [train], [federation], [privacy] tables."
)
SET_OPTION = typer.Option([], "--set", help="Override any field: --set world.synthetic.num_observations=20000.")


def run_app(app: typer.Typer, debug: Callable[[], bool] = lambda: False) -> None:
    """Run a command line: errors print one line and exit non-zero, with the traceback when `debug()` says so."""
    try:
        app(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except Exception as error:  # noqa: BLE001 - the one place that turns any failure into one line
        if debug():
            raise
        Console(stderr=True).print(f"[red]error:[/red] {error}", highlight=False)
        sys.exit(1)
