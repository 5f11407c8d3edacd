"""What the command modules share: the console and the options that name a run config."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

console = Console(width=None if sys.stdout.isatty() else 140)  # logs and pipes get whole tables

CONFIG_OPTION = typer.Option(
    None, help="TOML file with [world], [model], [conversion], [train], [federation], [privacy] tables."
)
SET_OPTION = typer.Option([], "--set", help="Override any field: --set world.synthetic.num_observations=20000.")
