"""The fleet tool behind `geomoe deploy`: containers on every field device through the Docker SDK.

A fleet file (TOML) lists devices; each runs one container (`geomoe-<name>`) of a role (supernode,
superlink, serverapp, expert-server, runtime) with its location and limits, and keeps its data in a named
volume (`geomoe-<name>-data`) that outlives container updates. Every action runs per device and
reports per device: one unreachable device does not stop the others.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from geomoe.deploy.certs import DEVICE_NAME, EXPERT_TOKEN, check_device_name, device_auth_key, device_server_pair
from geomoe.expert_parallel.placement import FleetDevice
from geomoe.wire.bounded import printable

ROLES = ("supernode", "expert-server", "runtime", "superlink", "serverapp")
SUPERLINK_ADDRESS = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}")  # host:port SuperNodes dial
DOCKER_SCHEMES = ("ssh", "unix")  # how the tool reaches a device's Docker engine (never plain TCP or HTTP)
RESERVED_ENVIRONMENT = frozenset(  # what run_options sets from the fleet file; a device's `environment` may not
    {"GEOMOE_DEVICE", "GEOMOE_LAT", "GEOMOE_LON", "GEOMOE_SUPERLINK", "GEOMOE_TLS", "GEOMOE_DATA"}
)
LABELLED = "/data/labelled"  # where a SuperNode container sees its device's labelled images
IMAGE_UID = 10001  # the user deploy/Dockerfile runs as; it must own what goes into /data


@dataclass
class Device:
    """One field device of a fleet file."""

    name: str  # container and volume names derive from it
    host: str  # Docker host: unix:///var/run/docker.sock, ssh://pi@cam-07, tcp://10.0.0.7:2376
    lat: float
    lon: float
    role: str = "supernode"
    cpus: float = 0.0  # 0: no limit
    memory: str = ""  # e.g. "1g"; "": no limit
    environment: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)  # overrides the role's command (custom entrypoints, diagnostics)
    data: str = ""  # supernode: folder of labelled images on the device, mounted read-only at /data/labelled
    image: str = ""  # this device's image, if not the fleet's (a camera-only Pi: the runtime-only image)
    expert_memory_kb: int | None = None  # memory it gives experts of its neighbours (expert-parallel placement)
    expert_address: str | None = None  # host:port its expert server listens on, where peers call it


@dataclass
class Fleet:
    image: str  # image every device runs (loaded with `geomoe deploy load`, no registry needed)
    superlink: str  # address SuperNodes dial, host:port
    devices: list[Device]
    tls: bool = True  # SuperLink serves TLS and admits only registered SuperNode keys; off only if the file says so
    certs: Path | None = None  # `geomoe deploy certs` folder; its files go into each volume
    rtt_ms: dict[tuple[str, str], float] = field(default_factory=dict)  # measured round trips between devices


def placement_devices(fleet: Fleet, path: Path) -> list[FleetDevice]:
    """The fleet's devices as expert placement sees them; each needs `expert_memory_kb`."""
    missing = [device.name for device in fleet.devices if device.expert_memory_kb is None]
    if missing:
        raise ValueError(f"{path}: device {missing[0]}: expert_memory_kb is needed to plan expert placement")
    return [FleetDevice(d.name, d.lat, d.lon, d.expert_memory_kb, d.expert_address) for d in fleet.devices]


def read_fleet_file(path: Path, certificates: bool = True) -> Fleet:
    """Parse and check a fleet file; errors name the file, the device and the field. With `certificates` (every
    action on devices) the certificate files each device needs must be present; a plan needs only the schema."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such fleet file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a TOML file ({error})") from None
    for key in ("image", "superlink"):
        if key not in data:
            raise ValueError(f"{path}: missing top-level '{key}'")
    entries = data.get("device", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{path}: 'device' must be [[device]] tables")
    devices, names = [], set()
    for index, entry in enumerate(entries):
        name = entry.get("name")
        label = name if isinstance(name, str) and DEVICE_NAME.match(name) else repr(name) if name else f"#{index}"
        try:
            device = read_device(entry)
        except ValueError as error:
            raise ValueError(f"{path}: device {label}: {error}") from None
        if device.name in names:
            raise ValueError(f"{path}: device {label}: name used twice")
        names.add(device.name)
        devices.append(device)
    if not devices:
        raise ValueError(f"{path}: no [[device]] tables")
    tls = data.get("tls", True)
    if not isinstance(tls, bool):
        raise ValueError(f"{path}: tls must be true or false, got {tls!r}")
    certs = path.parent / str(data["certs"]) if "certs" in data else None
    superlink = str(data["superlink"])
    if not SUPERLINK_ADDRESS.fullmatch(superlink):
        raise ValueError(f"{path}: superlink {superlink!r} must be host:port (letters, digits, '.', '-', or [IPv6])")
    fleet = Fleet(str(data["image"]), superlink, devices, tls, certs, _round_trips(data, path, names))
    needs_certs = tls or any(d.role == "expert-server" for d in devices)
    if needs_certs and certificates:
        if certs is None:
            why = "tls = true (the default; say tls = false to run without)" if tls else "an expert-server (its token)"
            raise ValueError(f"{path}: {why} needs 'certs', the folder `geomoe deploy certs` wrote")
        for device in devices:
            for source in certificate_files(device, fleet).values():
                if not source.is_file():
                    raise ValueError(
                        f"{path}: device {device.name}: {source} missing; "
                        f"run `geomoe deploy certs --out {certs} --device {device.name}`"
                    )
    return fleet


def read_device(entry: dict) -> Device:
    """One [[device]] table as a Device; ValueError names the field that is missing or wrong."""
    for key in ("name", "host", "lat", "lon"):
        if key not in entry:
            raise ValueError(f"missing field '{key}'")
    name, host = check_device_name(_field(entry, "name", str)), check_docker_host(_field(entry, "host", str))
    role = entry.get("role", "supernode")
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    lat, lon = _field(entry, "lat", float), _field(entry, "lon", float)
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"lat/lon {lat}, {lon} out of range")
    environment = {str(k): str(v) for k, v in _field(entry, "environment", dict, {}).items()}
    reserved = sorted(set(environment) & RESERVED_ENVIRONMENT)
    if reserved:
        raise ValueError(f"environment may not set {', '.join(reserved)}: the fleet tool sets it from the fleet file "
                         "(tls, lat, lon, superlink, data)")  # fmt: skip
    labelled = _field(entry, "data", str, "")
    if labelled and role != "supernode":
        raise ValueError("'data' is for supernodes (labelled images to train on)")
    return Device(
        name,
        host,
        lat,
        lon,
        role,
        _field(entry, "cpus", float, 0.0),
        _field(entry, "memory", str, ""),
        environment,
        [str(c) for c in _field(entry, "command", list, [])],
        labelled,
        _field(entry, "image", str, ""),
        _field(entry, "expert_memory_kb", int, None, optional=True),
        _field(entry, "expert_address", str, None, optional=True),
    )


def _round_trips(data: dict, path: Path, names: set[str]) -> dict[tuple[str, str], float]:
    """The `[rtt_ms]` table: "a,b" = milliseconds between two devices of the fleet."""
    table = data.get("rtt_ms", {})
    if not isinstance(table, dict):
        raise ValueError(f'{path}: rtt_ms must be a table of "a,b" = milliseconds')
    rtt = {}
    for pair, ms in table.items():
        a, _, b = (part.strip() for part in pair.partition(","))
        if a not in names or b not in names:
            raise ValueError(f"{path}: rtt_ms entry {printable(repr(pair), 80)} names a device not in the fleet")
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 <= ms < 1e6:
            raise ValueError(f"{path}: rtt_ms entry {pair!r} must be milliseconds, got {printable(repr(ms), 80)}")
        rtt[(a, b)] = float(ms)
    return rtt


FIELD_KINDS = {float: ((int, float), "a number"), int: ((int,), "a whole number"), str: ((str,), "a string"),
               dict: ((dict,), "a table"), list: ((list,), "an array")}  # fmt: skip


def _field(entry: dict, key: str, kind: type, default: Any = None, optional: bool = False) -> Any:
    """`entry[key]` as `kind` (numbers for float; a TOML table for dict; an array for list), else ValueError;
    an `optional` field left out is `default`."""
    if optional and key not in entry:
        return default
    value = entry.get(key, default)
    wanted, words = FIELD_KINDS[kind]
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise ValueError(f"field '{key}' must be {words}, got {printable(repr(value), 80)}")
    return float(value) if kind is float else value


def check_docker_host(host: str) -> str:
    """`host` if it is a Docker host the tool may dial: `ssh://[user@]host[:port]` or `unix:///path`, parsed (not
    prefix-matched: docker-py turns `TCP://`, `http://`, ` tcp://` and a bare `host:port` into plain HTTP, which
    gives root on the device to anyone on its network)."""
    parsed = urllib.parse.urlsplit(host)
    if host != host.strip() or parsed.scheme not in DOCKER_SCHEMES or any(c in host for c in "\r\n\t "):
        raise ValueError(f"Docker host {host!r} must be ssh://user@host or unix:///path/to/docker.sock (plain tcp:// "
                         "or http:// gives root on the device to anyone on its network)")  # fmt: skip
    if parsed.scheme == "ssh" and not parsed.hostname:
        raise ValueError(f"Docker host {host!r} names no machine")
    if parsed.scheme == "unix" and (parsed.netloc or not parsed.path.startswith("/")):
        raise ValueError(f"Docker host {host!r} must be unix:///absolute/path")
    return host


def container_name(device: Device) -> str:
    return f"geomoe-{device.name}"


def volume_name(device: Device) -> str:
    return f"geomoe-{device.name}-data"


def certificate_files(device: Device, fleet: Fleet) -> dict[str, Path]:
    """What goes into the device's /data/certs (name there -> file in the fleet's certs folder): with TLS the CA
    for everyone, the SuperLink's server pair for the SuperLink only, an expert server's own server pair, the
    SuperNode key for SuperNodes; an expert server's token always."""
    if fleet.certs is None:
        return {}
    files = {EXPERT_TOKEN: fleet.certs / EXPERT_TOKEN} if device.role == "expert-server" else {}
    if not fleet.tls:
        return files
    files["ca.pem"] = fleet.certs / "ca.pem"
    if device.role == "superlink":
        files |= {"server.pem": fleet.certs / "server.pem", "server.key": fleet.certs / "server.key"}
    if device.role == "expert-server":
        pem, key = device_server_pair(fleet.certs, device.name)
        files |= {"server.pem": pem, "server.key": key}
    if device.role == "supernode":
        files["device.auth"] = device_auth_key(fleet.certs, device.name)[0]
    return files


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
