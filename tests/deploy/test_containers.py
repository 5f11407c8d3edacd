"""The deployment for real: the amd64 image built from deploy/Dockerfile, a TLS SuperLink and SuperNodes
started by `geomoe deploy` through the Docker SDK on 127.0.0.1, registered SuperNode keys, one federated
round on the devices' own JPEG folders (mounted read-only), and a device whose key was never registered
being refused."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from geomoe.deploy.certs import ensure_fleet_certs
from geomoe.deploy.fleet_file import IMAGE_UID
from geomoe.wire.run_config import to_toml
from geomoe.world.world import World

from ..integration.conftest import SMALL_RUN, free_port, small_config
from .test_fleet import docker_client, image_build

pytestmark = [pytest.mark.docker, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IMAGE = "geomoe:container-test"


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port}")


SMALL_WORLD = [a for item in SMALL_RUN for a in ("--set", item)]


def geomoe(*args: str) -> str:
    result = subprocess.run([str(BIN / "geomoe"), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def file_archive(name: str, text: str, uid: int = IMAGE_UID) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        entry = tarfile.TarInfo(name)
        entry.size, entry.uid, entry.gid = len(text.encode()), uid, uid
        archive.addfile(entry, io.BytesIO(text.encode()))
    return buffer.getvalue()


def read_file(container, path: str) -> str:
    chunks, _ = container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as archive:
        return archive.extractfile(archive.getmembers()[0]).read().decode()


@pytest.fixture(scope="module")
def image():
    """The amd64 image, built from this checkout on the locally built Debian base. The tag stays as the next run's
    layer cache (its apt layer alone takes minutes to build); the image it replaces goes."""
    import docker

    client, base = docker_client()
    try:
        previous = client.images.get(IMAGE).id
    except docker.errors.ImageNotFound:
        previous = None
    built, _ = client.images.build(**image_build(base, "deploy/Dockerfile", IMAGE))
    if previous not in (None, built.id):
        client.images.remove(previous)
    return client


@pytest.fixture
def labelled_folders(tmp_path):
    """Device folders from `geomoe data export --format folders`, the third with a species the run lacks;
    in a folder the containers' user can read (pytest's own tmp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="geomoe-devices-"))
    try:
        geomoe("data", "export", "--format", "folders", "--out", str(folder), *SMALL_WORLD)
        third = folder / "L3"
        shutil.copytree(third / sorted(p.name for p in third.iterdir())[0], third / "Panthera leo")
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield folder, len(list((third / "Panthera leo").iterdir()))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_federated_round_in_containers_with_tls_and_registered_supernodes(image, tmp_path, labelled_folders):
    client = image
    folders, lions = labelled_folders
    tag = uuid.uuid4().hex[:6]
    link, server = f"link-{tag}", f"server-{tag}"
    cells, intruder = [f"cell-a-{tag}", f"cell-b-{tag}", f"cell-c-{tag}"], f"intruder-{tag}"
    ensure_fleet_certs(tmp_path / "certs", ["127.0.0.1"], [*cells, intruder])
    link_port = free_port()
    locations = World(small_config(tmp_path, tmp_path).world).locations
    local = 'host = "unix:///var/run/docker.sock"'
    devices = [
        f'[[device]]\nname = "{name}"\n{local}\nlat = 0\nlon = 0\nrole = "{role}"\n'
        for name, role in ((link, "superlink"), (server, "serverapp"))
    ]
    for k, (name, location) in enumerate(zip([*cells, intruder], [*locations, locations[0]], strict=True)):
        devices.append(
            f'[[device]]\nname = "{name}"\n{local}\n'
            f"lat = {location.lat}\nlon = {location.lon}\n"
            f'data = "{folders / f"L{k % 3 + 1}"}"\n'
            f'environment = {{ GEOMOE_APPIO_PORT = "{free_port()}" }}\n'
        )
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        f'image = "{IMAGE}"\nsuperlink = "127.0.0.1:{link_port}"\ntls = true\ncerts = "certs"\n\n' + "\n".join(devices)
    )
    # The run's configuration, where the ServerApp and the ClientApps read it.
    run_toml = to_toml(small_config("/data/runs/test", "/data/cache", rounds=1))
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{tmp_path / "certs" / "ca.pem"}"\n'
    )
    try:
        assert "superlink, TLS" in geomoe("deploy", "up", "--fleet", str(fleet), "--device", link)
        wait_for_port(link_port)
        registered = "".join(geomoe("deploy", "register", "--fleet", str(fleet), "--device", c) for c in cells)
        node_ids = set(re.findall(r"SuperNode (\d+) registered successfully", registered))
        assert len(node_ids) == 3
        started = geomoe("deploy", "up", "--fleet", str(fleet))
        assert started.count("supernode, TLS") == 4 and "serverapp, TLS" in started  # with the unregistered device
        for name in (server, *cells):
            client.containers.get(f"geomoe-{name}").put_archive("/data", file_archive("run.toml", run_toml))

        overrides = 'config="/data/run.toml" federation.rounds=1 federation.min_nodes=3 out="/data/runs/test"'
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "fleet", "--run-config", overrides, "--stream"],
            env={**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            timeout=540,
            start_new_session=True,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        report = json.loads(read_file(client.containers.get(f"geomoe-{server}"), "/data/runs/test/report.json"))
        assert [row["replies"] for row in report["rounds"]] == [3]
        by_cell = {loc["cell"]: loc for loc in report["locations"]}
        assert sorted(by_cell) == sorted(loc.cell for loc in locations)
        assert all(loc["source"].startswith("folder /data/labelled") for loc in by_cell.values())  # not generated
        assert by_cell[locations[2].cell]["unknown_species"] == {"Panthera leo": lions}
        assert report["rounds"][0]["unknown_species_images"] == lions

        refused = client.containers.get(f"geomoe-{intruder}").logs().decode(errors="replace")
        assert "Failed to activate SuperNode" in refused and "SuperNode ID" not in refused
        for name in cells:
            assert "SuperNode ID" in client.containers.get(f"geomoe-{name}").logs().decode(errors="replace")

        status = geomoe("deploy", "status", "--fleet", str(fleet))
        assert status.count("running") >= 4 and IMAGE.split(":")[0] in status

        # A new SuperLink container (same image here) keeps the registrations: they live in its volume.
        assert "volume" in geomoe("deploy", "update", "--fleet", str(fleet), "--device", link)
        wait_for_port(link_port)
        listing = subprocess.run(
            [str(BIN / "flwr"), "supernode", "ls", "fleet", "--format", "json"],
            env={**os.environ, "FLWR_HOME": str(flwr_home)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert node_ids <= set(re.findall(r'"node-id": "(\d+)"', listing.stdout)), listing.stdout + listing.stderr
    finally:
        subprocess.run([str(BIN / "geomoe"), "deploy", "down", "--fleet", str(fleet)], capture_output=True, check=False)
        for volume in client.volumes.list(filters={"name": tag}):
            volume.remove(force=True)


def test_compose_trial_runs_a_round(image, tmp_path):
    """deploy/compose.yaml as its header says to use it: SuperLink, ServerApp side, three SuperNodes."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose missing; CI installs Debian's")
    client, project, port = image, f"trial{uuid.uuid4().hex[:6]}", free_port()
    env = {**os.environ, "GEOMOE_IMAGE": IMAGE, "GEOMOE_PORT": str(port), "FLWR_HOME": str(tmp_path)}
    (tmp_path / "config.toml").write_text(
        f'[superlink]\ndefault = "trial"\n\n[superlink.trial]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    base = [compose, "-f", str(ROOT / "deploy" / "compose.yaml"), "-p", project]
    try:
        subprocess.run([*base, "up", "-d"], env=env, check=True, capture_output=True, timeout=120)
        wait_for_port(port)
        overrides = 'federation.rounds=1 federation.min_nodes=3 federation.pretrain_epochs=1 out="/data/runs/trial"'
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "trial", "--run-config", overrides, "--stream"],
            env={**env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            timeout=540,
            start_new_session=True,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        server = client.containers.get(f"{project}_serverapp_1")
        report = json.loads(read_file(server, "/data/runs/trial/report.json"))
        assert [row["replies"] for row in report["rounds"]] == [3]
    finally:
        subprocess.run([*base, "down", "-v"], env=env, capture_output=True, check=False, timeout=120)
