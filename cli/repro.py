"""`geomoe repro`: the geographic MoE paper's table on iNat 2017 and a published iNat-Geo split."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from geomoe.cli.options import SET_OPTION, console


def repro(
    inat: Path = typer.Option(
        ...,
        help="iNat 2017 folder: train_val_images/, train2017.json, val2017.json, "
        "train2017_locations.json, val2017_locations.json.",
    ),  # fmt: skip
    train_split: Path = typer.Option(..., help="Hsu et al. split, e.g. federated_train_geo_10k.csv."),
    test_split: Path = typer.Option(..., help="Hsu et al. test split (test.csv)."),
    out: Path = typer.Option(Path("runs/repro"), help="Run folder; the table goes to OUT/repro.md and .json."),
    cells: str = typer.Option("", help="Cells to compare, comma-separated [default: every client cell]."),
    set_: list[str] = SET_OPTION,
) -> None:
    """Pretrain, convert (64 experts, layers 1,3,5,7, d_e 2, bottleneck head), train federated, then per cell:
    dense vs MoE vs pruned MoE accuracy, parameters and FLOPs."""
    from geomoe.bench.papers import compare, paper_config, write_table
    from geomoe.sim.simulation import simulate

    cfg = paper_config(inat, train_split, test_split, out, set_)
    simulate(cfg)
    result = compare(Path(cfg.out), [c for c in cells.split(",") if c] or None)
    write_table(result, Path(cfg.out) / "repro.md")
    table = Table(title="dense vs MoE vs pruned per cell (Mensah et al. 2025)")
    for column in ("cell", "model", "test accuracy", "parameters", "MFLOPs"):
        table.add_column(column, justify="right")
    for row in result["cells"]:
        for model in row["models"]:
            table.add_row(row["cell"], model["model"], f"{model['accuracy']:.3f}", f"{model['parameters']:,}",
                          f"{model['mflops']:.0f}")  # fmt: skip
    console.print(table)
    console.print(f"wrote {Path(cfg.out) / 'repro.md'} and repro.json")
