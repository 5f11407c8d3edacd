"""`geomoe data export|prepare` and `geomoe partition`: datasets in the published formats, the world file,
Hsu et al. split CSVs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import typer
from rich.table import Table

from geomoe.cli.options import CONFIG_OPTION, SET_OPTION, console

app = typer.Typer(no_args_is_help=True, help="Datasets: export the synthetic world in published formats; prepare.")
SHOWN_CLIENTS = 50  # rows of the client table; the rest are counted


@app.command("export")
def export(
    fmt: str = typer.Option(..., "--format", help="inat2017 | inat2021 | hsu | iwildcam | folders."),
    out: Path = typer.Option(..., help="Folder to write."),
    at: str = typer.Option(None, help="folders: only the device folder of the location holding LAT,LON."),
    config: Path = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Write the synthetic world in a published format (JPEGs + annotations), to run the real-data path."""
    from geomoe.wire.run_config import build_run_config
    from geomoe.world.export import export_world, location_at
    from geomoe.world.world import World

    cfg = build_run_config(config, {}, set_)
    locations = None
    if at is not None:
        try:
            lat, lon = (float(v) for v in at.split(","))
        except ValueError:
            raise click.BadParameter(f"expected LAT,LON, got {at!r}", param_hint="--at") from None
        locations = [location_at(World(cfg.world), lat, lon)]
    summary = export_world(cfg.world, fmt, out, locations, progress=sys.stderr.isatty())
    console.print_json(json.dumps(summary))


@app.command("prepare")
def prepare(
    cache: Path = typer.Option(Path("runs/sim/cache"), help="Folder for the world file (a run's cache folder)."),
    config: Path = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Load and partition the run's dataset once; write the world file clients load; a table of clients."""
    from geomoe.wire.run_config import build_run_config
    from geomoe.world.world import World

    cfg = build_run_config(config, {}, set_)
    with console.status(f"loading {cfg.world.dataset} and partitioning it"):
        world, path, sha = World.cached(cfg.world, cache)
    if world.data.skipped:
        console.print(f"left out while loading: {world.data.skipped}")
    table = Table(title=f"{len(world.locations)} clients ({cfg.world.clients}), {world.num_classes} species")
    for column in ("client", "cell", "lat", "lon", "train", "val", "test", "species"):
        table.add_column(column, justify="right")
    for k, loc in enumerate(world.locations[:SHOWN_CLIENTS]):
        sizes = (len(loc.train), len(loc.val), len(loc.test), len(world.species(loc.train)))
        table.add_row(str(k), loc.cell, f"{loc.lat:.2f}", f"{loc.lon:.2f}", *map(str, sizes))
    console.print(table)
    if len(world.locations) > SHOWN_CLIENTS:
        console.print(f"... and {len(world.locations) - SHOWN_CLIENTS} more clients")
    console.print(f"world file: {path} (sha256 {sha[:16]}...), server keeps {len(world.server_indices)} images")


def partition(
    dataset: str = typer.Option("synthetic", help="synthetic | inat2017 | inat2021 | iwildcam | hsu | folder."),
    nmax: int = typer.Option(500, help="Hsu et al. N_max: split cells whose top species has more examples."),
    out: Path = typer.Option(Path("split.csv"), help="Hsu-format CSV to write (user_id = S2 cell)."),
    plot: Path = typer.Option(None, help="PNG map of the cells coloured by size."),
    config: Path = CONFIG_OPTION,
    set_: list[str] = typer.Option([], "--set", help="Files of the dataset: --set world.files.annotations='[...]'."),
) -> None:
    """Partition a dataset into adaptive S2 cells and write a Hsu et al. split CSV."""
    from geomoe.wire.run_config import build_run_config
    from geomoe.world.partition import write_partition

    cfg = build_run_config(config, {"world.dataset": dataset, "world.n_max": nmax}, set_)
    data, _, rows = write_partition(cfg.world, out)
    if data.skipped:
        console.print(f"left out while loading: {data.skipped}")
    table = Table(title=f"{len(rows)} cells, N_max={cfg.world.n_max}")
    for column in ("cell", "level", "examples", "species", "top species share"):
        table.add_column(column, justify="right")
    for row in rows:
        level = "-" if row.level is None else str(row.level)
        table.add_row(row.cell, level, str(row.examples), str(row.species), f"{row.top_share:.2f}")
    console.print(table)
    if plot is not None:
        from geomoe.world.maps import plot_cells

        plot_cells(rows, data.lat, data.lon, plot)
        console.print(f"map: {plot}")
    console.print(f"split: {out}")
