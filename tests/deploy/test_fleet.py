"""The fleet file, and the fleet tool against a real Docker engine on this machine."""

import io
import os
import tarfile
import uuid
from pathlib import Path

import pytest

from geomoe.deploy.certs import ensure_fleet_certs
from geomoe.deploy.fleet import (
    certificate_archive,
    command_for,
    down,
    for_each,
    load_image,
    logs,
    run_options,
    save_image,
    status,
    up,
    update,
)
from geomoe.deploy.fleet_file import Device, Fleet, certificate_files, placement_devices, read_fleet_file

FLEET = """image = "geomoe:latest"
superlink = "127.0.0.1:9092"
tls = false
certs = "certs"

[[device]]
name = "cam-07"
host = "ssh://pi@cam-07"
lat = -1.40
lon = 35.01
cpus = 2
memory = "1g"

[[device]]
name = "relay"
host = "ssh://pi@relay"
lat = -1.41
lon = 35.02
role = "expert-server"
"""


def fleet_file(tmp_path, text: str = FLEET, devices=("cam-07", "relay")):
    """The fleet file `text` next to a certs folder issued for `devices`."""
    ensure_fleet_certs(tmp_path / "certs", ["127.0.0.1"], list(devices))
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def tls_fleet(tmp_path, devices=("cam-07", "relay")):
    return fleet_file(tmp_path, FLEET.replace("tls = false", "tls = true"), devices)


def test_tls_fleet_puts_each_role_its_certificates(tmp_path):
    fleet = read_fleet_file(tls_fleet(tmp_path))
    camera, relay = fleet.devices
    assert certificate_files(camera, fleet) == {
        "ca.pem": tmp_path / "certs" / "ca.pem",
        "device.auth": tmp_path / "certs" / "devices" / "cam-07.auth",
    }
    assert certificate_files(relay, fleet) == {  # the relay's own server pair, never the SuperLink's key
        "expert.token": tmp_path / "certs" / "expert.token",
        "ca.pem": tmp_path / "certs" / "ca.pem",
        "server.pem": tmp_path / "certs" / "devices" / "relay-server.pem",
        "server.key": tmp_path / "certs" / "devices" / "relay-server.key",
    }
    with tarfile.open(fileobj=io.BytesIO(certificate_archive(certificate_files(camera, fleet)))) as archive:
        entries = {entry.name: entry for entry in archive.getmembers()}
        assert entries["certs"].isdir() and entries["certs"].mode == 0o700
        assert entries["certs/device.auth"].mode == 0o600 and entries["certs/ca.pem"].mode == 0o644
        assert {entry.uid for entry in entries.values()} == {10001}  # the image's user reads them
        key = archive.extractfile("certs/device.auth").read()
    assert key == (tmp_path / "certs" / "devices" / "cam-07.auth").read_bytes()


def test_tls_fleet_names_what_is_missing(tmp_path):
    path = tls_fleet(tmp_path)
    read_fleet_file(path)
    path.write_text(path.read_text().replace('name = "cam-07"', 'name = "cam-09"'))
    with pytest.raises(ValueError, match=r"device cam-09: .*cam-09.auth missing; run `geomoe deploy certs"):
        read_fleet_file(path)
    path.write_text(path.read_text().replace('certs = "certs"\n', ""))
    with pytest.raises(ValueError, match=r"tls = true \(the default; say tls = false to run without\) needs 'certs'"):
        read_fleet_file(path)


def test_fleet_file(tmp_path):
    path = fleet_file(tmp_path)
    fleet = read_fleet_file(path)
    assert [d.name for d in fleet.devices] == ["cam-07", "relay"]
    assert command_for(fleet.devices[0], fleet) == ["supernode"]
    options = run_options(fleet.devices[0], fleet)
    assert (
        options["environment"]["GEOMOE_LAT"] == "-1.4"
        and options["environment"]["GEOMOE_SUPERLINK"] == "127.0.0.1:9092"
    )
    assert options["network_mode"] == "host" and options["nano_cpus"] == 2_000_000_000 and options["mem_limit"] == "1g"
    assert options["volumes"] == {"geomoe-cam-07-data": {"bind": "/data", "mode": "rw"}}


def test_a_device_trains_on_its_own_folder_mounted_read_only(tmp_path):
    path = fleet_file(tmp_path, FLEET.replace('name = "cam-07"', 'name = "cam-07"\ndata = "/srv/camera/labelled"'))
    options = run_options(read_fleet_file(path).devices[0], read_fleet_file(path))
    assert options["volumes"]["/srv/camera/labelled"] == {"bind": "/data/labelled", "mode": "ro"}
    assert options["environment"]["GEOMOE_DATA"] == "/data/labelled"
    path.write_text(FLEET.replace('role = "expert-server"', 'role = "expert-server"\ndata = "/srv/x"'))
    with pytest.raises(ValueError, match="device relay: 'data' is for supernodes"):
        read_fleet_file(path)


def test_a_camera_only_device_runs_its_own_image(tmp_path):
    camera = '[[device]]\nname = "cam-09"\nhost = "ssh://pi@cam-09"\nlat = -1.4\nlon = 35.0\nrole = "runtime"\n'
    path = fleet_file(tmp_path, FLEET + camera + 'image = "geomoe-camera:latest"\n', ("cam-07", "relay", "cam-09"))
    fleet = read_fleet_file(path)
    supernode, _, runtime = fleet.devices
    assert run_options(runtime, fleet)["image"] == "geomoe-camera:latest"  # the runtime-only image
    assert run_options(supernode, fleet)["image"] == "geomoe:latest"  # the fleet's
    assert run_options(runtime, fleet, "geomoe-camera:v2")["image"] == "geomoe-camera:v2"  # `update --image`


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.replace('host = "ssh://pi@cam-07"\n', ""), "device cam-07: missing field 'host'"),
        (lambda t: t.replace('role = "expert-server"', 'role = "camera"'), "device relay: role 'camera'"),
        (lambda t: t.replace("lat = -1.40", "lat = 100"), "device cam-07: lat/lon 100.0"),
        (lambda t: t.replace('name = "relay"', 'name = "cam-07"'), "name used twice"),
        (lambda t: t.replace('image = "geomoe:latest"\n', ""), "missing top-level 'image'"),
        (
            lambda t: t.replace('name = "relay"', 'name = "../../etc"'),
            "device '../../etc': device name '../../etc' must",
        ),
        (lambda t: t.replace('name = "relay"', 'name = "Relay 1"'), "device name 'Relay 1' must be"),
        (lambda t: t.replace('host = "ssh://pi@cam-07"', 'host = "tcp://10.0.0.7:2375"'), "must be ssh://"),
        (lambda t: t.replace('host = "ssh://pi@cam-07"', 'host = "TCP://10.0.0.7:2375"'), "must be ssh://"),
        (lambda t: t.replace('host = "ssh://pi@cam-07"', 'host = "http://10.0.0.7:2375"'), "must be ssh://"),
        (lambda t: t.replace('host = "ssh://pi@cam-07"', 'host = " tcp://10.0.0.7:2375"'), "must be ssh://"),
        (lambda t: t.replace('host = "ssh://pi@cam-07"', 'host = "10.0.0.7:2375"'), "must be ssh://"),
        (lambda t: t.replace('host = "ssh://pi@cam-07"', 'host = "unix://relay/sock"'), "unix:///absolute/path"),
        (lambda t: t.replace('name = "relay"', 'name = "localhost"'), "device name 'localhost' is reserved"),
        (lambda t: t.replace('name = "relay"', 'name = "superlink"'), "device name 'superlink' is reserved"),
        (lambda t: t.replace('name = "relay"', 'name = "127-0-0-1"'), "device name '127-0-0-1' is reserved"),
        (
            lambda t: t.replace('name = "cam-07"', 'name = "cam-07"\nenvironment = { GEOMOE_TLS = "0" }'),
            "device cam-07: environment may not set GEOMOE_TLS",
        ),
        (
            lambda t: t.replace('name = "cam-07"', 'name = "cam-07"\nenvironment = { GEOMOE_LAT = "1 data=/etc" }'),
            "environment may not set GEOMOE_LAT",
        ),
        (
            lambda t: t.replace('superlink = "', 'superlink = "x\\"\\ninsecure = true\\n#'),
            "superlink .* must be host:port",
        ),
        (lambda t: t.replace("tls = false\n", "").replace('certs = "certs"\n', ""), r"tls = true \(the default"),
        (lambda t: t.replace("tls = false", 'tls = "no"'), "tls must be true or false"),
        (lambda t: t.replace('certs = "certs"\n', ""), r"an expert-server \(its token\) needs 'certs'"),
        (lambda t: t.replace("cpus = 2", "expert_memory_kb = 1.5"), "field 'expert_memory_kb' must be a whole number"),
        (lambda t: t + '[rtt_ms]\n"cam-07,cam-99" = 3\n', "rtt_ms entry 'cam-07,cam-99' names a device not in"),
        (lambda t: t + '[rtt_ms]\n"cam-07,relay" = "fast"\n', "rtt_ms entry 'cam-07,relay' must be milliseconds"),
    ],
)
def test_bad_fleet_files_name_device_and_field(tmp_path, change, message):
    path = fleet_file(tmp_path, change(FLEET))
    with pytest.raises(ValueError, match=message):
        read_fleet_file(path)


def docker_client():
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        pytest.skip(f"no Docker engine reachable ({error}); CI starts one")
    base = os.environ.get("GEOMOE_DOCKER_BASE", "geomoe-base:bookworm")
    try:
        client.images.get(base)
    except docker.errors.ImageNotFound:
        pytest.skip(f"base image {base} missing: build it with deploy/base_image.sh")
    return client, base


def image_build(base: str, dockerfile: str, tag: str) -> dict:
    """Arguments for `client.images.build` of one of deploy/'s Dockerfiles from this checkout.

    The Docker SDK keeps every intermediate container unless told otherwise (`rm=False`, unlike the
    CLI): about 100 of them, 14 GB, per test run. `forcerm` removes them after a failed step too.
    """
    root = Path(__file__).resolve().parents[2]
    return dict(path=str(root), dockerfile=dockerfile, buildargs={"BASE": base}, tag=tag, network_mode="host",
                rm=True, forcerm=True)  # fmt: skip


@pytest.mark.docker
def test_fleet_lifecycle_on_a_real_engine(tmp_path):
    import docker

    client, base = docker_client()
    tag = f"geomoe-fleet-test:{uuid.uuid4().hex[:8]}"
    client.images.get(base).tag(tag)
    name = f"t{uuid.uuid4().hex[:6]}"
    local = Device(
        name,
        "unix:///var/run/docker.sock",
        -1.4,
        35.0,
        command=["sh", "-c", "echo hello from $GEOMOE_DEVICE; sleep 600"],
    )
    unreachable = Device(f"{name}-far", "tcp://127.0.0.1:9", 0.0, 0.0, command=["sleep", "600"])
    fleet = Fleet(tag, "127.0.0.1:9092", [local, unreachable], tls=False)
    connect = lambda host: docker.DockerClient(base_url=host, timeout=5)  # noqa: E731
    try:
        outcomes = for_each(fleet.devices, up(fleet), connect)
        assert outcomes[0].ok and "started" in outcomes[0].detail
        assert not outcomes[1].ok and outcomes[1].device == f"{name}-far"  # reported, and did not stop the others

        container = client.containers.get(f"geomoe-{name}")
        container.exec_run(["sh", "-c", "echo kept > /data/state.txt"])
        assert for_each([local], status, connect)[0].detail.startswith("running")
        assert "hello from " + name in for_each([local], logs(10), connect)[0].detail

        archive = tmp_path / "image.tar"
        save_image(client, tag, archive)
        assert for_each([local], load_image(archive), connect)[0].ok

        replaced = for_each([local], update(fleet, tag), connect)[0]
        assert replaced.ok and "volume" in replaced.detail
        new = client.containers.get(f"geomoe-{name}")
        assert new.id != container.id
        assert new.exec_run(["cat", "/data/state.txt"]).output.strip() == b"kept"  # data volume survived

        assert "kept" in for_each([local], down, connect)[0].detail
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(f"geomoe-{name}")
        client.volumes.get(f"geomoe-{name}-data")  # still there
    finally:
        for leftover in client.containers.list(all=True, filters={"label": f"geomoe.device={name}"}):
            leftover.remove(force=True)
        for volume in client.volumes.list(filters={"name": f"geomoe-{name}"}):
            volume.remove(force=True)
        client.images.remove(tag, force=True)


def test_entrypoint_roles():
    from geomoe.deploy.entrypoint import command

    env = {"GEOMOE_LAT": "1.5", "GEOMOE_LON": "-2", "GEOMOE_SUPERLINK": "10.0.0.2:9092"}
    assert command("supernode", env) == [
        "flower-supernode",
        "--insecure",
        "--superlink",
        "10.0.0.2:9092",
        "--node-config",
        "lat=1.5 lon=-2",
    ]
    assert command("supernode", {**env, "GEOMOE_DATA": "/data/labelled"})[-1] == 'lat=1.5 lon=-2 data="/data/labelled"'
    secure = command("supernode", {**env, "GEOMOE_TLS": "1", "GEOMOE_APPIO_PORT": "9105"})
    assert (
        "--insecure" not in secure
        and secure[secure.index("--auth-supernode-private-key") + 1] == "/data/certs/device.auth"
    )
    assert secure[secure.index("--port") + 1] == "9105"
    link = command("superlink", {**env, "GEOMOE_TLS": "1"})
    assert link[link.index("--host") + 1] == "10.0.0.2" and link[link.index("--port") + 1] == "9092"  # where nodes dial
    assert "--enable-supernode-auth" in link and "--database" in link  # registrations outlive the container
    assert link[link.index("--isolation") + 1] == "process"  # ServerApps run in the serverapp container
    assert command("serverapp", {**env, "GEOMOE_TLS": "1"})[-4:] == [
        "--runtime-api-address",
        "10.0.0.2:9092",
        "--root-certificates",
        "/data/certs/ca.pem",
    ]
    relay = command("expert-server", {**env, "GEOMOE_TLS": "1", "GEOMOE_DEVICE": "relay"})
    assert relay[relay.index("--cert") + 1] == "/data/certs/server.pem" and relay[relay.index("--name") + 1] == "relay"
    assert relay[relay.index("--token-file") + 1] == "/data/certs/expert.token"  # off loopback it must have one
    assert "--token-file" in command("expert-server", env)
    runtime = command("runtime", env)
    assert (
        runtime[1:4] == ["-m", "geomoe.cli.device", "run"] and runtime[runtime.index("--model") + 1] == "/data/model.ts"
    )
    onnx = command("runtime", {**env, "GEOMOE_MODEL": "/data/model.onnx"})  # the runtime-only image's
    assert onnx[onnx.index("--model") + 1] == "/data/model.onnx" and "--threads" not in onnx
    one_core = command("runtime", {**env, "GEOMOE_THREADS": "1"})  # the rest left to capture and upload
    assert one_core[one_core.index("--threads") + 1] == "1"
    with pytest.raises(SystemExit, match="unknown role"):
        command("camera", env)


def test_one_fleet_file_also_describes_expert_placement(tmp_path):
    text = FLEET.replace("cpus = 2", "expert_memory_kb = 64") + '[rtt_ms]\n"cam-07,relay" = 12.5\n'
    path = tmp_path / "fleet.toml"
    path.write_text(text.replace("tls = false", "tls = true"))  # a plan needs no certificates
    fleet = read_fleet_file(path, certificates=False)
    assert fleet.rtt_ms == {("cam-07", "relay"): 12.5}
    with pytest.raises(ValueError, match="device relay: expert_memory_kb is needed to plan expert placement"):
        placement_devices(fleet, path)
    path.write_text(text.replace('role = "expert-server"', 'role = "expert-server"\nexpert_memory_kb = 32\n'
                                 'expert_address = "127.0.0.1:50052"'))  # fmt: skip
    devices = placement_devices(read_fleet_file(path, certificates=False), path)
    assert [(d.name, d.memory_kb, d.address) for d in devices] == [
        ("cam-07", 64, None),
        ("relay", 32, "127.0.0.1:50052"),
    ]
