"""`geomoe expert-server serve|plan`: serve experts to nearby devices over gRPC; plan who holds which."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
import typer
from rich.table import Table

from geomoe.cli.options import console

app = typer.Typer(no_args_is_help=True, help="Serve experts to nearby devices over gRPC; plan placement.")


@app.command("serve")
def serve(
    model: Path = typer.Option(..., help="Model file (from `geomoe prune` or a run's checkpoint.pt)."),
    address: str = typer.Option("127.0.0.1:50051", help="host:port to listen on (port 0: any free port)."),
    token_file: Path = typer.Option(None, help="File holding the shared token callers must send."),
    cert: Path = typer.Option(None, help="TLS certificate (PEM) of this server, e.g. from `geomoe deploy certs`."),
    key: Path = typer.Option(None, help="TLS private key (PEM)."),
    name: str = typer.Option("expert-server", help="Device name reported to peers."),
) -> None:
    """Serve the experts a model file holds until interrupted."""
    from geomoe.expert_parallel.host import ExpertHost
    from geomoe.expert_parallel.service import ExpertServer, TlsFiles
    from geomoe.server.checkpoint import load_model

    if (cert is None) != (key is None):
        raise click.BadParameter("give both --cert and --key, or neither", param_hint="--cert")
    loaded, _ = load_model(model)
    token = token_file.read_text().strip() if token_file else None
    tls = TlsFiles(certificate=cert.read_bytes(), private_key=key.read_bytes()) if cert else None
    server = ExpertServer(ExpertHost(loaded), address=address, token=token, tls=tls, device=name)
    bound = server.start()
    held = {layer: m.expert_ids.tolist() for layer, m in loaded.moe_layers().items()}
    security = f"{'TLS' if tls else 'plaintext'}, {'token' if token else 'no token'}"
    console.print(f"serving experts {held} on {bound} ({security})")
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()


@app.command("plan")
def plan(
    fleet: Path = typer.Option(
        ...,
        help="The fleet file (geomoe deploy's): each [[device]] with expert_memory_kb (and expert_address); [rtt_ms].",
    ),
    run: Path = typer.Option(..., help="Run folder whose checkpoint.pt and locations give each device's needs."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Assign experts to devices (own needs first, nearest peers next) and show bytes per image."""
    from geomoe.deploy.fleet_file import placement_devices, read_fleet_file
    from geomoe.prune.finished_run import FinishedRun, fleet_plan

    fleet_file = read_fleet_file(fleet, certificates=False)
    devices = placement_devices(fleet_file, fleet)
    placement = fleet_plan(FinishedRun.open(run), devices, fleet_file.rtt_ms)
    if as_json:
        print(json.dumps(asdict(placement), indent=2))
        return
    table = Table(title=f"expert placement for {len(devices)} devices")
    for column in ("device", "holds (layer: experts)", "asks", "unserved", "kB/image to peers"):
        table.add_column(column)
    for device in devices:
        held = placement.holds[device.name].items()
        holds = "; ".join(f"{layer}: {','.join(map(str, ids))}" for layer, ids in held if ids)
        asks = "; ".join(f"{layer}.{e}->{p}" for layer, m in placement.asks[device.name].items() for e, p in m.items())
        unserved = "; ".join(f"{layer}: {ids}" for layer, ids in placement.unserved[device.name].items())
        cost = ", ".join(f"{p} {b / 1e3:.1f}" for p, b in placement.bytes_per_image[device.name].items())
        table.add_row(device.name, holds, asks or "-", unserved or "-", cost or "-")
    console.print(table)
