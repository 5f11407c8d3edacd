"""`geomoe model info`: parameters and FLOPs of the dense, MoE and a pruned model."""

from __future__ import annotations

import json

import click
import typer
from rich.table import Table

from geomoe.cli.options import console

app = typer.Typer(no_args_is_help=True, help="Inspect model shapes, parameters and FLOPs.")


@app.command("info")
def info(
    experts: int = typer.Option(16, help="Experts per MoE layer."),
    layers: str = typer.Option("1,3,5,7", help="Transformer layers (0..8) with experts."),
    expert_hidden: int = typer.Option(2, help="Hidden units per expert."),
    classes: int = typer.Option(182, help="Output classes."),
    image_size: int = typer.Option(256, help="Image side for FLOP counting."),
    keep: int = typer.Option(4, help="Experts per layer kept in the pruned example."),
    head: str = typer.Option("linear", help="linear, or bottleneck (256-1024-256-classes, the papers' iNat head)."),
    gate_rank: int | None = typer.Option(
        None, help="Low-rank gate rank (8 in the geographic paper); unset: cosine router."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters and FLOPs of the dense, MoE and a pruned model."""
    from geomoe.model.config import ModelConfig
    from geomoe.model.counting import size_comparison

    try:
        moe_layers = tuple(int(x) for x in layers.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(
            f"expected layer numbers like 1,3,5,7, got {layers!r}", param_hint="--layers"
        ) from None
    cfg = ModelConfig(
        num_classes=classes,
        moe_layers=moe_layers,
        num_experts=experts,
        expert_hidden=expert_hidden,
        head=head,
        gate_rank=gate_rank,
    )
    result = size_comparison(cfg, keep, image_size)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    shape = f"{experts} experts at layers {layers}, d_e={expert_hidden}, {head} head, {image_size} px"
    table = Table(title=f"MobileViTV2-0.5, {shape}")
    for column in ("model", "parameters", "expert params", "MFLOPs", "state MB"):
        table.add_column(column, justify="right")
    for name, s in result.items():
        table.add_row(
            name,
            f"{s['parameters']:,}",
            f"{s['expert_parameters']:,}",
            f"{s['flops'] / 1e6:.0f}",
            f"{s['state_bytes'] / 1e6:.2f}",
        )
    console.print(table)
