"""Long server phases (world loading, pretraining, conversion, queries) shown with their elapsed time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn


def progress(console: Console | None = None) -> Progress:
    """A progress display: spinner, description, bar (when the total is known), elapsed time. On a terminal it
    is live and goes away when done; in a log (a stream, a file) its final state is written once."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    console = console or Console(stderr=True)
    return Progress(*columns, console=console, transient=console.is_terminal)


@contextmanager
def phase(description: str, console: Console | None = None) -> Iterator[None]:
    """Show `description` with a spinner and the elapsed time while the block runs."""
    with progress(console) as display:
        display.add_task(description, total=None)
        yield
