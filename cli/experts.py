"""`geomoe experts importance` and `geomoe prune`: a location's experts in a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from geomoe.cli.options import console

app = typer.Typer(no_args_is_help=True, help="Expert importance and keep sets for a location.")
RUN_OPTION = typer.Option(..., help="Run folder holding checkpoint.pt.")
CELL_OPTION = typer.Option(..., help="S2 cell of the location, e.g. '3/30'.")
PERCENTILE_OPTION = typer.Option(90.0, help="Edge-weight percentile threshold.")


@app.command("importance")
def importance(
    run: Path = RUN_OPTION,
    cell: str = CELL_OPTION,
    percentile: float = PERCENTILE_OPTION,
    per_expert: bool = typer.Option(False, help="Also measure each expert's accuracy drop (slow)."),
) -> None:
    """Keep set of a location from routing its validation images through the global model."""
    from geomoe.model.importance import KeepPolicy, keep_set, per_expert_importance
    from geomoe.prune.finished_run import BATCH, FinishedRun

    finished = FinishedRun.open(run)
    location = finished.location(cell)
    stats = finished.routing(location)
    keep = keep_set(stats, KeepPolicy(percentile=percentile))
    table = Table(title=f"keep set of {cell} at the {percentile:g}th percentile")
    table.add_column("layer", justify="right")
    table.add_column("experts kept")
    table.add_column("patches on kept", justify="right")
    for layer, ids in keep.items():
        counts = stats.expert_counts[layer]
        table.add_row(str(layer), ", ".join(map(str, ids)), f"{counts[ids].sum() / max(counts.sum(), 1):.0%}")
    console.print(table)
    if per_expert:
        drops = per_expert_importance(finished.model, list(finished.world.loader(location.val, BATCH)))
        console.print_json(json.dumps({str(k): v for k, v in drops.items()}))


def prune(
    run: Path = RUN_OPTION,
    cell: str = CELL_OPTION,
    out: Path = typer.Option(..., help="Compact model file to write."),
    percentile: float = PERCENTILE_OPTION,
    policy: str = typer.Option("best_present", help="Patches whose expert was pruned: best_present or remove."),
    head: str = typer.Option("local", help="local: keep the head rows of the location's species (+ other); all."),
) -> None:
    """Write a compact per-location model (pruned experts and head) that loads on its own."""
    from geomoe.prune.finished_run import FinishedRun, prune_for_location
    from geomoe.server.checkpoint import save_model

    finished = FinishedRun.open(run)
    pruned = prune_for_location(finished, cell, percentile, policy, head)
    save_model(pruned.model, out, cell=cell, keep=pruned.keep, species=finished.world.data.class_names)
    console.print(
        f"{out}: {pruned.parameters:,} parameters (full {pruned.full_parameters:,}); "
        f"test accuracy {pruned.accuracy:.3f} (full {pruned.full_accuracy:.3f})"
    )
