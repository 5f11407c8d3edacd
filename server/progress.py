"""Long server phases (world loading, pretraining, conversion, queries) shown with their elapsed time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn


def progress(console: Console | None = None) -> Progress:
    """A transient progress display: spinner, description, bar (when the total is known), elapsed time."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=console or Console(stderr=True), transient=True)


@contextmanager
def phase(description: str, console: Console | None = None) -> Iterator[None]:
    """Show `description` with a spinner and the elapsed time while the block runs."""
    with progress(console) as display:
        display.add_task(description, total=None)
        yield
