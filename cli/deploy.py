"""`geomoe deploy ...`: the fleet's certificates and its Docker containers, one device at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click
import typer
from rich.table import Table

from geomoe.cli.options import console

app = typer.Typer(no_args_is_help=True, help="Deploy to field devices with Docker: certificates and the fleet.")
FLEET_OPTION = typer.Option(Path("fleet.toml"), "--fleet", help="Fleet file (TOML).")
DEVICE_OPTION = typer.Option(None, "--device", help="Act on this device only.")


@app.command("certs")
def certs(
    out: Path = typer.Option(Path("certs"), help="Folder for ca.pem, server.pem/.key and devices/<name>.*"),
    server_host: list[str] = typer.Option(
        ["127.0.0.1", "localhost"], help="Names/IPs of the SuperLink and expert servers (first run only)."
    ),
    device: list[str] = typer.Option([], help="Device names to issue a certificate and SuperNode key for."),
) -> None:
    """A fleet CA and server certificate (once), and per device a TLS certificate and a SuperNode
    authentication key (devices/<name>.auth, .auth.pub). Rerun with new names to add devices."""
    from geomoe.deploy.certs import ensure_fleet_certs

    written = ensure_fleet_certs(out, list(server_host), list(device))
    for line in written or ["nothing new: every device named already has its keys"]:
        console.print(f"{out}: {line}")


def _fleet_action(fleet_file: Path, only: str | None, action_for: Callable, needs_docker: bool = True) -> None:
    """Run `action_for(fleet)` on each chosen device; a table of outcomes; exit 1 if any failed."""
    import docker

    from geomoe.deploy.fleet import for_each
    from geomoe.deploy.fleet_file import read_fleet_file

    fleet = read_fleet_file(fleet_file)
    devices = [d for d in fleet.devices if only in (None, d.name)]
    if not devices:
        raise click.BadParameter(f"no device {only!r} in {fleet_file}", param_hint="--device")
    connect = (lambda host: docker.DockerClient(base_url=host, timeout=20)) if needs_docker else (lambda host: None)
    outcomes = for_each(devices, action_for(fleet), connect)
    table = Table(title=str(fleet_file))
    for column in ("device", "ok", "detail"):
        table.add_column(column)
    for outcome in outcomes:
        table.add_row(outcome.device, "yes" if outcome.ok else "[red]no[/red]", outcome.detail)
    console.print(table)
    if not all(o.ok for o in outcomes):
        raise typer.Exit(1)


@app.command("up")
def up(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION) -> None:
    """Start each device's container (and its data volume) if it is not running."""
    from geomoe.deploy.fleet import up as start

    _fleet_action(fleet, device, start)


@app.command("down")
def down(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION) -> None:
    """Remove each device's container; its data volume stays."""
    from geomoe.deploy.fleet import down as remove

    _fleet_action(fleet, device, lambda _: remove)


@app.command("status")
def status(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION) -> None:
    """State, image and start time of each device's container."""
    from geomoe.deploy.fleet import status as state

    _fleet_action(fleet, device, lambda _: state)


@app.command("logs")
def logs(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION, tail: int = typer.Option(20)) -> None:
    """Last lines of each device's container log."""
    from geomoe.deploy.fleet import logs as container_logs

    _fleet_action(fleet, device, lambda _: container_logs(tail))


@app.command("update")
def update(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION, image: str = typer.Option(None)) -> None:
    """Replace each device's container with the (new) image, keeping its data volume."""
    from geomoe.deploy.fleet import update as replace

    _fleet_action(fleet, device, lambda f: replace(f, image))


@app.command("register")
def register(fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION) -> None:
    """Register each SuperNode's public key (name, location) on the fleet's TLS SuperLink, which
    admits registered devices only. Run once the SuperLink is up; devices keep retrying until then."""
    from geomoe.deploy.fleet import register as admit

    _fleet_action(fleet, device, lambda f: lambda _client, d: admit(f, d), needs_docker=False)


@app.command("load")
def load(archive: Path, fleet: Path = FLEET_OPTION, device: str = DEVICE_OPTION) -> None:
    """Load a `docker save` archive onto devices: images move without a registry."""
    from geomoe.deploy.fleet import load_image

    if not archive.is_file():
        raise click.BadParameter(f"no archive at {archive}", param_hint="ARCHIVE")
    _fleet_action(fleet, device, lambda _: load_image(archive))


@app.command("save")
def save(image: str, archive: Path) -> None:
    """Write a local image to an archive for `geomoe deploy load`."""
    import docker

    from geomoe.deploy.fleet import save_image

    save_image(docker.from_env(), image, archive)
    console.print(f"wrote {archive} ({archive.stat().st_size / 1e6:.0f} MB)")
