"""`geomoe sim`: the federated job on Flower's simulation runtime, one virtual SuperNode per client."""

from __future__ import annotations

from pathlib import Path

import typer

from geomoe.cli.options import CONFIG_OPTION, console


def sim(
    rounds: int = typer.Option(None, help="Federated rounds [default: 3]."),
    strategy: str = typer.Option(None, help="expert (per-expert averaging) or fedavg (dense baseline)."),
    out: Path = typer.Option(None, help="Output folder for report.json and checkpoint.pt [default: runs/sim]."),
    cells: int = typer.Option(None, help="Locations (S2 cells) that become clients [default: 6]."),
    local_epochs: int = typer.Option(None, help="Local epochs per round [default: 1]."),
    experts: int = typer.Option(None, help="Experts per MoE layer [default: 16]."),
    dataset: str = typer.Option(
        None, help="synthetic | inat2017 | inat2021 | iwildcam | hsu (files: --set world.files.*)."
    ),
    seed: int = typer.Option(None, help="Seed of everything [default: 0]."),
    config: Path = CONFIG_OPTION,
    set_: list[str] = typer.Option([], "--set", help="Override any field: --set federation.keep.percentile=80."),
    resume: bool = typer.Option(False, help="Continue a killed run from its last completed round."),
    ray_address: str = typer.Option(None, help="Address of an existing Ray cluster (e.g. 'auto')."),
    cpus_per_client: int = typer.Option(1, help="CPUs Ray reserves for each virtual client."),
    gpus_per_client: float = typer.Option(
        None, help="Share of a GPU each virtual client reserves (0.25: four per GPU) [default: 0.2 with a GPU, else 0]."
    ),
    verbose: bool = typer.Option(False, help="Show Flower's and Ray's logs."),
    print_config: bool = typer.Option(False, help="Print the effective config as TOML (for --config) and exit."),
) -> None:
    """Simulate federated training on Flower's simulation runtime (the path `flwr run` takes), one virtual
    SuperNode per client."""
    from geomoe.sim.simulation import ClientResources, simulate
    from geomoe.wire.run_config import build_run_config, to_toml

    flags = {
        "federation.rounds": rounds,
        "federation.strategy": strategy,
        "out": out,
        "world.num_locations": cells,
        "train.epochs": local_epochs,
        "model.num_experts": experts,
        "world.dataset": dataset,
        "seed": seed,
    }
    cfg = build_run_config(config, flags, set_)
    if print_config:
        print(to_toml(cfg), end="")
        return
    default = ClientResources.default()
    resources = ClientResources(cpus_per_client, default.gpus if gpus_per_client is None else gpus_per_client)
    report = simulate(cfg, resume, ray_address, resources, verbose)  # the ServerApp prints its table
    console.print(f"final accuracy {report['final_accuracy']:.3f}; report: {Path(cfg.out) / 'report.json'}")
