"""`geomoe comm report`: communication cost of finished runs as a table, CSV and plot."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from geomoe.cli.options import console

app = typer.Typer(no_args_is_help=True, help="Communication cost of runs: tables, CSV, plots, link times.")


@app.command("report")
def report(
    runs: list[Path] = typer.Argument(..., help="Run folders holding report.json."),
    out: Path = typer.Option(Path("."), help="Folder for comm.csv and comm.png."),
    link: list[str] = typer.Option(
        ["lora", "iridium", "lte-m", "wifi"],
        help="Link profiles (lora, iridium, 3g, lte-m, wifi or name:bps:latency_s:overhead).",
    ),
) -> None:
    """Per run: MB up/down per client per round, totals, accuracy, accuracy per MB and link times."""
    from geomoe.analysis.comm_report import load_report, plot, run_label, summarise_run, write_csv
    from geomoe.world.links import parse_link

    links = [parse_link(text) for text in link]
    reports = {run: load_report(run) for run in runs}
    rows = [summarise_run(run, r, links) for run, r in reports.items()]
    table = Table(title="communication cost per client per round")
    columns = ["run", "up MB", "down MB", "total MB", "accuracy", "acc./upload MB", *[f"{k.name} s" for k in links]]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["run"],
            f"{row['up_mb_per_client_round']:.3f}",
            f"{row['down_mb_per_client_round']:.3f}",
            f"{row['total_mb']:.1f}",
            f"{row['accuracy']:.3f}",
            f"{row['accuracy_per_upload_mb']:.2f}",
            *[f"{row[f'{k.name}_s_per_round']:.0f}" for k in links],
        )
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "comm.csv")
    plot({run_label(run, r): r for run, r in reports.items()}, out / "comm.png")
    console.print(f"wrote {out / 'comm.csv'} and {out / 'comm.png'}")
