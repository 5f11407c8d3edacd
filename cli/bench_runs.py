"""`geomoe bench comm|privacy|scale`: benchmarks that run whole federations (registered on `geomoe bench`)."""

from __future__ import annotations

from pathlib import Path

import click
import typer
from rich.table import Table

from geomoe.cli.options import CONFIG_OPTION, SET_OPTION, console


def comm(
    out: Path = typer.Option(Path("runs/bench-comm"), help="Folder for the runs and bench_comm.json."),
    rounds: int = typer.Option(5, help="Rounds of each run."),
    compressed: str = typer.Option("int8+zstd", help="Upload pipeline of the compressed per-expert run."),
    seed: int = typer.Option(0, help="Seed shared by all runs."),
) -> None:
    """Dense FedAvg, per-expert, and compressed per-expert on the same partitions, seed and initial model."""
    from geomoe.bench.comm import bench_comm

    result = bench_comm(out, rounds, compressed, seed, announce=console.print)
    table = Table(title="per-expert vs dense FedAvg")
    for column in ("run", "upload kB/client/round", "ratio to fedavg", "final accuracy", "accuracy at equal upload"):
        table.add_column(column, justify="right")
    for name in result["final_accuracy"]:
        table.add_row(
            name,
            f"{result['upload_per_client_round'][name] / 1e3:.1f}",
            f"{result['upload_ratio_to_fedavg'][name]:.4f}",
            f"{result['final_accuracy'][name]:.3f}",
            f"{result['accuracy_at_equal_upload'][name]:.3f}",
        )
    console.print(table)
    console.print(f"wrote {out / 'bench_comm.json'}")


def privacy(
    out: Path = typer.Option(Path("runs/bench-privacy"), help="Folder for the runs, bench_privacy.json and .png."),
    rounds: int = typer.Option(5, help="Rounds of each run."),
    noise: str = typer.Option("0.03,0.1,0.3", help="Noise multipliers of the DP runs, comma-separated."),
    attacks: str = typer.Option("scaled,sign_flipped", help="Attacks of the hostile node, comma-separated."),
    aggregators: str = typer.Option("mean,median,trimmed_mean", help="Aggregators compared, comma-separated."),
    config: Path = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Accuracy vs epsilon (client-level DP), and accuracy with 1 hostile node per aggregator, on one world."""
    from geomoe.bench.privacy import bench_privacy, compares_aggregators
    from geomoe.wire.run_config import build_run_config

    try:
        multipliers = tuple(float(z) for z in noise.split(","))
    except ValueError:
        raise click.BadParameter(f"expected numbers like 0.1,1.0, got {noise!r}", param_hint="--noise") from None
    base = build_run_config(config, {"federation.rounds": rounds}, set_)
    split = (tuple(a for a in attacks.split(",") if a), tuple(a for a in aggregators.split(",") if a))
    result = bench_privacy(out, base, multipliers, *split, announce=console.print)
    table = Table(title=f"client-level DP ({result['nodes']} nodes, {result['rounds']} rounds)")
    for column in ("noise multiplier", "epsilon", "final accuracy, nodes", "server (all species)"):
        table.add_column(column, justify="right")

    def accuracy(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table.add_row("no DP", "-", accuracy(result["no_dp_accuracy"]), accuracy(result["no_dp_server_accuracy"]))
    for row in result["dp"]:
        table.add_row(f"{row['noise_multiplier']:g}", f"{row['epsilon']:.3g}", accuracy(row["final_accuracy"]),
                      accuracy(row["final_server_accuracy"]))  # fmt: skip
    console.print(table)
    if compares_aggregators(result):
        robust = Table(title="final accuracy with 1 hostile node")
        names = list(next(iter(result["robustness"].values())))
        for column in ("attack", *names):
            robust.add_column(column, justify="right")
        for attack, row in result["robustness"].items():
            robust.add_row(attack, *(f"{row[name]:.3f}" for name in names))
        console.print(robust)
    console.print(f"wrote {out / 'bench_privacy.json'} and {out / 'bench_privacy.png'}")


def scale(
    out: Path = typer.Option(Path("runs/bench-scale"), help="Folder for the runs, bench_scale.json and .png."),
    cells: str = typer.Option("10,100,1000", help="Simulation sizes (cells), comma-separated."),
    rounds: int = typer.Option(2, help="Rounds of each run."),
    sampled: int = typer.Option(100, help="Cells sampled per round (at most)."),
) -> None:
    """Time per phase, the framework's share of a round and peak memory of all processes, per simulation size."""
    from geomoe.bench.scale import bench_scale

    try:
        sizes = [int(c) for c in cells.split(",") if c]
    except ValueError:
        raise click.BadParameter(f"expected numbers like 10,100, got {cells!r}", param_hint="--cells") from None
    result = bench_scale(out, sizes, rounds, sampled, announce=console.print)
    table = Table(title=f"simulation scale ({result['cpus']} CPUs, {rounds} rounds)")
    for column in ("cells", "set-up s", "round s", "train s", "framework share", "peak memory GiB"):
        table.add_column(column, justify="right")
    for size, row in result["sizes"].items():
        table.add_row(
            size,
            f"{sum(row['setup_s'].values()):.0f}",
            f"{row['round_s']:.1f}",
            f"{row['phases_s']['train']:.1f}",
            f"{row['framework_share']:.0%}",
            f"{row['peak_memory_bytes'] / 2**30:.2f}",
        )
    console.print(table)
    console.print(f"wrote {out / 'bench_scale.json'} and {out / 'bench_scale.png'}")


QUICK_LINKS = {  # a world small enough for a CI-scale check: 3 cells, 8 experts, short pretraining
    "world.synthetic.num_observations": 3000,
    "world.num_locations": 3,
    "world.n_max": 300,
    "federation.pretrain_epochs": 3,
    "model.num_experts": 8,
    "federation.buffer_size": 2,
    "federation.eval_every": 2,
}


def links(
    out: Path = typer.Option(Path("runs/bench-links"), help="Folder for the runs, bench_links.json and .png."),
    sync_rounds: int = typer.Option(10, help="Rounds of each synchronous run (at most)."),
    async_aggregations: int = typer.Option(20, help="Aggregations of each asynchronous run (at most)."),
    train_minutes: float = typer.Option(20.0, help="Simulated minutes a device's local training takes."),
    round_timeout_min: float = typer.Option(60.0, help="How long a synchronous round waits (simulated minutes)."),
    quick: bool = typer.Option(False, help="A 3-cell world with short pretraining, for a quick check."),
    config: Path = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Sync rounds vs async buffered aggregation under three availability traces, on the simulated clock."""
    from geomoe.bench.links import bench_links
    from geomoe.wire.run_config import build_run_config

    flags = {**(QUICK_LINKS if quick else {}), "federation.round_timeout_s": round_timeout_min * 60}
    base = build_run_config(config, flags, set_)
    result = bench_links(out, base, sync_rounds, async_aggregations, train_minutes, announce=console.print)
    table = Table(title=f"sync vs async ({result['nodes']} nodes; target accuracy {result['target_accuracy']:.3f})")
    for column in ("run", "updates", "sim. hours", "hours to target", "MB to target", "acc. after a week",
                   "refused stale", "wasted node-h", "fitted / deferred"):  # fmt: skip
        table.add_column(column, justify="right")

    def number(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    for name, run in result["runs"].items():
        table.add_row(
            name,
            str(run["updates_aggregated"]),
            number(run["sim_hours"], ".1f"),
            number(run["hours_to_target"], ".1f"),
            number(run["bytes_to_target"] and run["bytes_to_target"] / 1e6, ".2f"),
            number(run["accuracy_after_a_week"], ".3f"),
            str(run["refused_stale"]),
            number(run["wasted_node_hours"], ".2f"),
            f"{run['link_compressed']} / {run['link_deferred']}",
        )
    console.print(table)
    console.print(f"wrote {out / 'bench_links.json'} and {out / 'bench_links.png'}")
