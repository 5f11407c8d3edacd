"""`geomoe experts graph|affinity|sweep`: the papers' figures of a finished run, as PNG + JSON (and a table)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from geomoe.cli.experts import CELL_OPTION, RUN_OPTION
from geomoe.cli.options import console


def _out(run: Path, out: Path | None, name: str) -> Path:
    folder = out or run / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def graph(
    run: Path = RUN_OPTION,
    cell: str = CELL_OPTION,
    out: Path = typer.Option(None, help="Folder for the PNG and JSON [default: RUN/figures]."),
) -> None:
    """Cross-layer patch-routing graph of a location: edges by share of patches, banded by percentile."""
    from geomoe.analysis.routing_graph import plot_routing_graph, routing_graph
    from geomoe.prune.finished_run import FinishedRun

    finished = FinishedRun.open(run)
    result = routing_graph(finished.routing(finished.location(cell)), cell)
    stem = _out(run, out, f"graph-{cell.replace('/', '_')}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot_routing_graph(result, stem.with_suffix(".png"))
    strong = sum(e["band"] != "below 90th" for pair in result["pairs"] for e in pair["edges"])
    console.print(f"{strong} edges at or above the 90th percentile; wrote {stem}.png and .json")


def affinity(
    run: Path = RUN_OPTION,
    epochs: int = typer.Option(2, help="Epochs fitting the location projection on the run's training images."),
    out: Path = typer.Option(None, help="Folder for the PNG and JSON [default: RUN/figures]."),
) -> None:
    """Affinity of species and of the last layer's experts to the run's cells (location embeddings)."""
    from geomoe.analysis.affinity import affinity as compute
    from geomoe.analysis.affinity import plot_affinity
    from geomoe.prune.finished_run import FinishedRun

    result = compute(FinishedRun.open(run), epochs)
    stem = _out(run, out, "affinity")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot_affinity(result, stem.with_suffix(".png"))
    console.print(f"{len(result['classes'])} species, {len(result['expert_cell'])} experts; wrote {stem}.png and .json")


def sweep(
    run: Path = RUN_OPTION,
    cell: str = CELL_OPTION,
    percentiles: str = typer.Option("0,50,75,90,95,99,99.9", help="Thresholds, comma-separated."),
    out: Path = typer.Option(None, help="Folder for the PNG and JSON [default: RUN/figures]."),
) -> None:
    """Experts dropped and test accuracy of a location for a range of percentile thresholds, both policies."""
    from geomoe.analysis.pruning_sweep import plot_sweep, pruning_sweep
    from geomoe.model.config import ABSENT_POLICIES
    from geomoe.prune.finished_run import FinishedRun

    try:
        thresholds = tuple(float(p) for p in percentiles.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"expected numbers like 50,90, got {percentiles!r}", param_hint="--percentiles"
        ) from None
    result = pruning_sweep(FinishedRun.open(run), cell, thresholds)
    stem = _out(run, out, f"sweep-{cell.replace('/', '_')}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot_sweep(result, stem.with_suffix(".png"))
    table = Table(title=f"pruning {cell} (global model: {result['full_accuracy']:.3f})")
    for column in ("percentile", f"dropped of {result['experts_total']}", *ABSENT_POLICIES):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        accuracy = (f"{row['accuracy'][policy]:.3f}" for policy in ABSENT_POLICIES)
        table.add_row(f"{row['percentile']:g}", str(row["experts_dropped"]), *accuracy)
    console.print(table)
    console.print(f"wrote {stem}.png and .json")


COMMANDS = {"graph": graph, "affinity": affinity, "sweep": sweep}  # registered under `geomoe experts`
