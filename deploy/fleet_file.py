"""The fleet file: a TOML list of field devices (where each is, its Docker host, role, limits, data, image, what
it gives neighbours' experts) and the fleet's SuperLink, certificates and measured round trips. One schema for
deploying (`geomoe deploy`) and for planning expert placement (`geomoe expert-server plan`); errors name the file,
the device and the field."""

from __future__ import annotations

import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
