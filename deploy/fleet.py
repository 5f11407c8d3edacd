"""The fleet tool behind `geomoe deploy`: containers on every field device through the Docker SDK.

A fleet file (`deploy/fleet_file.py`) lists devices; each runs one container (`geomoe-<name>`) of a role (supernode,
superlink, serverapp, expert-server, runtime) with its location and limits, and keeps its data in a named
volume (`geomoe-<name>-data`) that outlives container updates. Every action runs per device and
reports per device: one unreachable device does not stop the others.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from geomoe.deploy.certs import device_auth_key
from geomoe.deploy.fleet_file import IMAGE_UID, LABELLED, Device, Fleet, certificate_files


def container_name(device: Device) -> str:
    return f"geomoe-{device.name}"


def volume_name(device: Device) -> str:
    return f"geomoe-{device.name}-data"


def certificate_archive(files: dict[str, Path], uid: int = IMAGE_UID) -> bytes:
    """A tar of `certs/<name>` owned by the image's user, keys 0600, for `put_archive` into /data."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        folder = tarfile.TarInfo("certs")
        folder.type, folder.mode, folder.uid, folder.gid = tarfile.DIRTYPE, 0o700, uid, uid
        archive.addfile(folder)
        for name, source in sorted(files.items()):
            data = source.read_bytes()
            entry = tarfile.TarInfo(f"certs/{name}")
            entry.size, entry.uid, entry.gid = len(data), uid, uid
            entry.mode = 0o644 if name.endswith(".pem") else 0o600
            archive.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def command_for(device: Device, fleet: Fleet) -> list[str]:
    """What the container runs: the image's entrypoint role (or the device's own `command`)."""
    return device.command or [device.role]


def image_of(device: Device, fleet: Fleet, override: str | None = None) -> str:
    """The image a device runs: one named for this command, else the device's own, else the fleet's."""
    return override or device.image or fleet.image


def run_options(device: Device, fleet: Fleet, image: str | None = None) -> dict[str, Any]:
    """Keyword arguments of `containers.create` for a device (host networking, data volume, limits)."""
    options: dict[str, Any] = {
        "image": image_of(device, fleet, image),
        "command": command_for(device, fleet),
        "name": container_name(device),
        "network_mode": "host",
        "restart_policy": {"Name": "unless-stopped"},
        "volumes": {volume_name(device): {"bind": "/data", "mode": "rw"}},
        "environment": {
            "GEOMOE_DEVICE": device.name,
            "GEOMOE_LAT": str(device.lat),
            "GEOMOE_LON": str(device.lon),
            "GEOMOE_SUPERLINK": fleet.superlink,
            "GEOMOE_TLS": "1" if fleet.tls else "0",
            **device.environment,
        },
        "labels": {"geomoe.device": device.name, "geomoe.role": device.role},
    }
    if device.data:  # the device's own labelled images, read-only: training never changes them
        options["volumes"][device.data] = {"bind": LABELLED, "mode": "ro"}
        options["environment"] = {"GEOMOE_DATA": LABELLED, **options["environment"]}
    if device.cpus:
        options["nano_cpus"] = int(device.cpus * 1e9)
    if device.memory:
        options["mem_limit"] = device.memory
    return options


@dataclass
class Outcome:
    device: str
    ok: bool
    detail: str


def for_each(
    devices: list[Device], action: Callable[[Any, Device], str], connect: Callable[[str], Any]
) -> list[Outcome]:
    """Run `action(client, device)` on every device; a failure is reported for that device only."""
    outcomes = []
    for device in devices:
        try:
            client = connect(device.host)
            outcomes.append(Outcome(device.name, True, action(client, device)))
        except Exception as error:  # noqa: BLE001 - one device's failure must not stop the fleet
            outcomes.append(Outcome(device.name, False, f"{type(error).__name__}: {error}".splitlines()[0]))
    return outcomes


def _container(client: Any, device: Device):
    import docker

    try:
        return client.containers.get(container_name(device))
    except docker.errors.NotFound:
        return None


def _start(client: Any, device: Device, fleet: Fleet, image: str | None = None) -> Any:
    """Create the device's container, put its certificates into the data volume, start it."""
    container = client.containers.create(**run_options(device, fleet, image))
    files = certificate_files(device, fleet)
    if files:
        container.put_archive("/data", certificate_archive(files))
    container.start()
    return container


def up(fleet: Fleet) -> Callable[[Any, Device], str]:
    def action(client: Any, device: Device) -> str:
        existing = _container(client, device)
        if existing is not None:
            if existing.status != "running":
                existing.start()
            return f"{container_name(device)} already there ({existing.status})"
        client.volumes.create(volume_name(device))
        container = _start(client, device, fleet)
        return f"started {container.name} ({device.role}{', TLS' if fleet.tls else ''})"

    return action


def down(client: Any, device: Device) -> str:
    container = _container(client, device)
    if container is None:
        return "nothing running"
    container.remove(force=True)
    return f"removed {container_name(device)}; volume {volume_name(device)} kept"


def status(client: Any, device: Device) -> str:
    container = _container(client, device)
    if container is None:
        return "not deployed"
    container.reload()
    image = container.image.tags[0] if container.image.tags else container.image.short_id
    return f"{container.status} {image} since {container.attrs['State'].get('StartedAt', '?')[:19]}"


def logs(tail: int) -> Callable[[Any, Device], str]:
    def action(client: Any, device: Device) -> str:
        container = _container(client, device)
        if container is None:
            return "not deployed"
        return container.logs(tail=tail).decode(errors="replace").rstrip()

    return action


def update(fleet: Fleet, image: str | None) -> Callable[[Any, Device], str]:
    """Replace the container with one of `image`, keeping the data volume."""

    def action(client: Any, device: Device) -> str:
        client.images.get(image_of(device, fleet, image))  # fail before touching a running container
        old = _container(client, device)
        if old is not None:
            old.remove(force=True)
        container = _start(client, device, fleet, image)
        replacement = image_of(device, fleet, image)
        return f"replaced with {replacement} ({container.short_id}); volume {volume_name(device)} kept"

    return action


def load_image(archive: Path) -> Callable[[Any, Device], str]:
    """Load a `docker save` archive onto each device (no registry needed)."""

    def action(client: Any, device: Device) -> str:
        with archive.open("rb") as f:
            images = client.images.load(f.read())
        return "loaded " + ", ".join(t for image in images for t in image.tags)

    return action


def save_image(client: Any, image: str, archive: Path) -> None:
    with archive.open("wb") as f:
        for chunk in client.images.get(image).save(named=True):
            f.write(chunk)


def registration_config(fleet: Fleet) -> str:
    """Flower's config.toml naming the fleet's SuperLink (TLS, trusting the fleet CA), written by a TOML writer:
    no value of the fleet file can add a key (`insecure = true`) to it."""
    connection = {"address": fleet.superlink, "root-certificates": str((fleet.certs / "ca.pem").resolve())}
    return tomli_w.dumps({"superlink": {"default": "fleet", "fleet": connection}})


def register(fleet: Fleet, device: Device) -> str:
    """Register the SuperNode's public key (with its name and location) on the fleet's SuperLink,
    which then admits that device and no unregistered one. Uses Flower's own `flwr supernode register`
    over a TLS connection that trusts the fleet CA."""
    if not fleet.tls:  # a TLS fleet always has its certs folder (read_fleet_file checks)
        raise ValueError("registration needs tls = true in the fleet file")
    if device.role != "supernode":
        return f"skipped ({device.role})"
    public_key = device_auth_key(fleet.certs, device.name)[1]
    with tempfile.TemporaryDirectory() as flwr_home:
        (Path(flwr_home) / "config.toml").write_text(registration_config(fleet))
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "flwr"),
                "supernode",
                "register",
                str(public_key),
                "fleet",
                "--name",
                device.name,
                "--location",
                f"{device.lat},{device.lon}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "FLWR_HOME": flwr_home},
        )
    output = (result.stdout + result.stderr).strip().splitlines()
    if result.returncode != 0:
        raise RuntimeError(output[-1] if output else f"flwr supernode register exited {result.returncode}")
    return output[-1] if output else "registered"
