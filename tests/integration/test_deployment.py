"""Flower's deployment runtime: a real SuperLink and two SuperNodes on 127.0.0.1, driven by `flwr run`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from geomoe.bench.hostile import HOSTILE_APPS
from geomoe.data.cells import coarsened
from geomoe.wire.privacy import PrivacyConfig
from geomoe.wire.run_config import to_toml
from geomoe.world.export import export_world
from geomoe.world.world import World

from .conftest import free_port, small_config, stop
from .link_proxy import LinkProxy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Waits that only bound a hang: the first run of a session pretrains the initial model (a cold cache), which took
# over 400 s on these two cores while other work ran. A deadline is not a speed target.
HANG_S = 1200


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port}: {log.read_text()[-2000:]}")


def start(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def flwr_command(connection: str, cfg, tmp_path: Path, extra: str = "", rounds: int = 2, app: Path = ROOT) -> list[str]:
    """`flwr run` of this project (or another `app` folder) on `connection` for `rounds` rounds of `cfg`."""
    config_file = tmp_path / "run.toml"
    config_file.write_text(to_toml(cfg))
    overrides = f'config="{config_file}" federation.rounds={rounds} out="{cfg.out}" cache="{cfg.cache}" {extra}'
    return [str(BIN / "flwr"), "run", str(app), connection, "--run-config", overrides.strip(), "--stream"]


def running(run: subprocess.Popen, out: Path) -> bool:
    """Whether `flwr run` is still running; if it ended, an assertion error with what it printed and the server's
    traceback, if it left one in the run's folder `out`."""
    if run.poll() is None:
        return True
    error = out / "server-error.txt"
    left = error.read_text() if error.is_file() else "(no server-error.txt)"
    raise AssertionError(f"flwr run ended early ({run.returncode}): {run.stdout.read()[-3000:]}\n{left[-3000:]}")


def hostile_app(tmp_path: Path, attack: str) -> Path:
    """This project as a Flower app whose ClientApp is `geomoe.bench.hostile`'s `attack`: the node whose node config
    says `hostile=true` applies it, the others are honest. The FAB carries no code (see pyproject.toml)."""
    honest = 'clientapp = "geomoe.client.client_app:app"'
    project = (ROOT / "pyproject.toml").read_text()
    assert honest in project
    app = tmp_path / f"{attack}-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(project.replace(honest, f'clientapp = "{HOSTILE_APPS[attack]}"'))
    shutil.copy(ROOT / "README.md", app / "README.md")
    return app


@contextmanager
def federation(tmp_path, node_configs: list[str], proxy: LinkProxy | None = None):
    """A SuperLink and one SuperNode per node config on 127.0.0.1; yields the env for `flwr run`, the nodes and a
    function that starts one more node (a device joining later; with `via_proxy`, over `proxy`'s link)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(tmp_path / "flwr-home")}
    link_port = free_port()
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    processes = []

    if proxy is not None:
        proxy.target = link_port

    def add_node(node_config: str, via_proxy: bool = False) -> subprocess.Popen:
        node_port, log = free_port(), tmp_path / f"supernode{len(processes)}.log"
        node_command = [
            str(BIN / "flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{proxy.port if via_proxy else link_port}",
            "--port",
            str(node_port),
            "--node-config",
            node_config,
        ]
        # Devices sharing this host's cores: with a thread per core each, a round ran 5x slower and past its timeout.
        node = start(node_command, log, {**env, "OMP_NUM_THREADS": "1"})
        processes.append(node)
        wait_for_port(node_port, node, log)
        return node

    try:
        link_command = [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--port",
            str(link_port),
            "--disable-runtime-dependency-installation",
        ]
        link = start(link_command, tmp_path / "superlink.log", env)
        processes.append(link)
        wait_for_port(link_port, link, tmp_path / "superlink.log")
        nodes = [add_node(node_config) for node_config in node_configs]
        yield env, nodes, add_node
    finally:
        for process in reversed(processes):
            stop(process)


def server_side_text(tmp_path, cfg, output: str) -> str:
    """Everything the server side wrote: its report, its streamed log, the SuperLink's log."""
    return output + (Path(cfg.out) / "report.json").read_text() + (tmp_path / "superlink.log").read_text()


def assert_no_coordinates(text: str, locations) -> None:
    """Nodes hold their coordinates in their node config; none may reach the server (any usual rendering). A
    round value (a face cell's centre at 0.0) could be any number in a log and is not looked for."""
    assert "lat=" not in text and "lon=" not in text
    for location in locations:
        for value in (location.lat, location.lon):
            if value == round(value, 2):
                continue
            for shown in (repr(value), f"{value:.6f}", f"{value:.5f}"):
                assert shown not in text, f"coordinate {shown} reached the server"


def device_folders(tmp_path: Path, cfg) -> tuple[Path, int]:
    """Labelled folders as `geomoe data export --format folders` writes them, one per location (L1, L2, L3); the
    third also holds a species the run does not know (its image count returned) and an empty species folder."""
    export_world(cfg.world, "folders", tmp_path / "devices")
    third = tmp_path / "devices" / "L3"
    shutil.copytree(third / sorted(p.name for p in third.iterdir())[0], third / "Panthera leo")
    (third / "Lynx lynx").mkdir()  # an empty species folder: counted, not an error
    return tmp_path / "devices", len(list((third / "Panthera leo").iterdir()))


def test_devices_on_a_superlink_train_on_their_own_folders_and_one_that_drops_out_does_not_stall_the_round(
    tmp_path, model_cache
):
    """Three rounds on a real SuperLink with client-level DP (central noise, int8+zstd uploads) and coarse
    locations. Each SuperNode trains on its own labelled folder; the second drops out after round 1 and the third,
    switched on then, takes part (it also holds a species the run does not know: reported and left out). The nodes
    report level-2 cells only, never their coordinates."""
    cfg = small_config(tmp_path / "run", model_cache)
    cfg.federation.round_timeout_s = 75.0  # in the config file: Flower overrides only pyproject's keys
    cfg.federation.upload_compression = "int8+zstd"
    cfg.federation.location_level = 2
    cfg.privacy = PrivacyConfig(clip_norm=1.0, noise_multiplier=0.001, adaptive_clip=True)
    folders, lions = device_folders(tmp_path, cfg)
    locations = World(cfg.world).locations
    configs = [f'lat={loc.lat} lon={loc.lon} data="{folders / f"L{k + 1}"}"' for k, loc in enumerate(locations)]
    with federation(tmp_path, configs[:2]) as (env, nodes, add_node):
        command = flwr_command("test", cfg, tmp_path, "federation.min_nodes=2", rounds=3)
        run = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            checkpoint = Path(cfg.out) / "checkpoint.pt"
            deadline = time.monotonic() + HANG_S
            while not (
                checkpoint.is_file() and torch.load(checkpoint, weights_only=False)["server_state"]["completed_round"]
            ):
                assert time.monotonic() < deadline and run.poll() is None, "round 1 did not complete"
                time.sleep(0.5)
            stop(nodes[1])  # gone in the middle of the run
            add_node(configs[2])  # a device switched on after set-up
            output, _ = run.communicate(timeout=HANG_S)
        finally:
            stop(run)
    assert run.returncode == 0, output[-3000:]
    report = json.loads((Path(cfg.out) / "report.json").read_text())
    rounds = report["rounds"]
    # Round 2 may or may not see the newcomer (it registers while round 2 starts); round 3 always does.
    assert rounds[0]["replies"] == 2 and rounds[1]["replies"] in (1, 2) and rounds[2]["replies"] == 2, rounds
    assert rounds[1]["phases"]["train"] < 75 + 30  # waited for replies at most the timeout, then went on
    coarse, index = coarsened([loc.cell for loc in locations], 2)
    assert coarse[index[2]] in [name.split("~")[0] for name in rounds[2]["sampled"]]  # queried and trained
    by_cell = {loc["cell"]: loc for loc in report["locations"]}
    assert set(by_cell) == set(coarse)
    assert all(loc["source"].startswith("folder ") for loc in by_cell.values())  # each trained on its own folder
    assert by_cell[coarse[index[2]]]["unknown_species"] == {"Panthera leo": lions}
    assert by_cell[coarse[index[2]]]["skipped"] == {"empty species folder 'Lynx lynx'": 1}
    assert by_cell[coarse[index[0]]]["unknown_species"] == {}
    assert rounds[0]["unknown_species_images"] == 0 and rounds[2]["unknown_species_images"] == lions
    epsilons = [row["epsilon"] for row in rounds]
    assert epsilons == sorted(epsilons) and report["privacy"]["epsilon"] == epsilons[-1] > 0
    assert len({row["clip_norm"] for row in rounds}) == 3  # the adaptive clip moved every round
    # DP noise comes from os.urandom: whether three noisy rounds raise accuracy is not the run's to say. What the
    # code guarantees: the model was scored before and after, on the same images.
    evaluations = report["evaluations"]
    assert {"0", str(len(rounds))} <= set(evaluations)
    assert all(0.0 <= e["server_accuracy"] <= 1.0 for e in evaluations.values())
    assert_no_coordinates(server_side_text(tmp_path, cfg, output), locations)


def test_a_supernode_registered_with_a_location_is_placed_by_it_on_a_tls_superlink(tmp_path, model_cache):
    """SuperNode authentication as a fleet runs it: TLS, the node's key registered on the SuperLink with a location
    (`flwr supernode register --location`, through `geomoe deploy register`). The node's own coordinates say L1;
    it was registered in L2's cell, and the server places it there."""
    from geomoe.deploy.certs import device_auth_key, ensure_fleet_certs
    from geomoe.deploy.fleet import register
    from geomoe.deploy.fleet_file import Device, Fleet

    cfg = small_config(tmp_path / "run", model_cache, rounds=1)
    locations = World(cfg.world).locations
    certs = tmp_path / "certs"
    ensure_fleet_certs(certs, ["127.0.0.1"], ["cam-0"])
    link_port, node_port = free_port(), free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{certs / "ca.pem"}"\n'
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(home)}
    tls = ["--ssl-ca-certfile", str(certs / "ca.pem"), "--ssl-certfile", str(certs / "server.pem"),
           "--ssl-keyfile", str(certs / "server.key")]  # fmt: skip
    link_command = [str(BIN / "flower-superlink"), *tls, "--enable-supernode-auth", "--port", str(link_port),
                    "--disable-runtime-dependency-installation"]  # fmt: skip
    processes = []
    try:
        link = start(link_command, tmp_path / "superlink.log", env)
        processes.append(link)
        wait_for_port(link_port, link, tmp_path / "superlink.log")
        registered_at = locations[1]
        device = Device("cam-0", "unix:///var/run/docker.sock", registered_at.lat, registered_at.lon)
        register(Fleet("geomoe", f"127.0.0.1:{link_port}", [device], True, certs), device)
        says = locations[0]
        node_command = [str(BIN / "flower-supernode"), "--root-certificates", str(certs / "ca.pem"),
                        "--auth-supernode-private-key", str(device_auth_key(certs, "cam-0")[0]),
                        "--superlink", f"127.0.0.1:{link_port}", "--port", str(node_port),
                        "--node-config", f"lat={says.lat} lon={says.lon}"]  # fmt: skip
        node = start(node_command, tmp_path / "supernode.log", {**env, "OMP_NUM_THREADS": "1"})
        processes.append(node)
        run = subprocess.run(flwr_command("test", cfg, tmp_path, rounds=1), env=env, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    finally:
        for process in reversed(processes):
            stop(process)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    report = json.loads((Path(cfg.out) / "report.json").read_text())
    assert [loc["cell"] for loc in report["locations"]] == [registered_at.cell]
    assert f"says it is in {says.cell} but was registered in {registered_at.cell}" in run.stdout + run.stderr


def test_a_field_node_that_loses_its_link_and_reboots_delivers_its_update_once_and_a_resend_is_refused(
    tmp_path, model_cache
):
    """Async on a real SuperLink, one SuperNode over a link that drops: the node gets its train message, its link
    goes down while it trains, and it is stopped (a reboot) with its finished update kept in its state folder.
    Restarted later on the same folder (a new SuperNode, a new node id), it is known again by the device id in that
    folder, answers its next message with the kept update, and that update is aggregated exactly once; the next
    message settles it and the node deletes it. A second SuperNode answers every train message after its first with
    that first update again (`bench.hostile`'s replaying node: a resend after lost acknowledgements): the server
    takes it once and refuses each resend as a duplicate delivery."""
    cfg = small_config(tmp_path / "run", model_cache)
    cfg.federation.mode = "async"
    cfg.federation.buffer_size = 1
    cfg.federation.eval_every = 1
    cfg.federation.message_ttl_s = 600.0  # long enough for a slow start of the ClientApp process
    cfg.federation.round_timeout_s = 120.0
    cfg.federation.upload_compression = "int8+zstd"  # lossy: the device keeps its error feedback with its updates
    folders, _ = device_folders(tmp_path, cfg)
    location, other = World(cfg.world).locations[:2]
    state = tmp_path / "device-state"
    device = f'lat={location.lat} lon={location.lon} data="{folders / "L1"}" state="{state}"'
    resender = f'lat={other.lat} lon={other.lon} data="{folders / "L2"}" hostile=true'
    proxy = LinkProxy()
    try:
        with federation(tmp_path, [resender], proxy) as (env, nodes, add_node):
            first = add_node(device, via_proxy=True)
            command = flwr_command("test", cfg, tmp_path, rounds=3, app=hostile_app(tmp_path, "replaying"))
            run = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
            try:
                resender_log, device_log = tmp_path / "supernode1.log", tmp_path / "supernode2.log"  # 0: SuperLink
                deadline = time.monotonic() + HANG_S
                while device_log.read_text().count("Received successfully") < 3:  # query, routing query, train
                    assert time.monotonic() < deadline and running(run, Path(cfg.out)), "the node got no train message"
                    time.sleep(0.05)
                proxy.down()  # the link drops while the node trains
                while not list((state / "outbox").glob("update-*.pb")):
                    assert time.monotonic() < deadline, "the node kept no finished update"
                    time.sleep(0.1)
                assert first.poll() is None  # the SuperNode lives on without its link, retrying
                stop(first)  # the device reboots, its update undelivered
                while resender_log.read_text().count("Sent successfully") < 4:  # query, routing, train, a resend
                    assert time.monotonic() < deadline and running(run, Path(cfg.out)), (
                        "the resending node sent no resend"
                    )
                    time.sleep(0.1)
                proxy.up()
                add_node(device, via_proxy=True)  # back, on the same state folder
                output, _ = run.communicate(timeout=HANG_S)
            finally:
                stop(run)
    finally:
        proxy.close()
    assert run.returncode == 0, output[-3000:]
    report = json.loads((Path(cfg.out) / "report.json").read_text())
    updates = [(name, version, s) for row in report["rounds"] for name, version, s in row["updates"]]
    assert len(report["rounds"]) == 3 and len({(n, v) for n, v, _ in updates}) == len(updates) == 3  # each once
    assert [v for n, v, _ in updates if n == other.cell] == [0]  # the resender's update, taken once
    kept = [(v, s) for n, v, s in updates if n == location.cell]
    assert kept[0][0] == 0 and kept[0][1] >= 0  # the update trained before the reboot, its staleness recorded
    assert sorted(loc["name"] for loc in report["locations"]) == sorted([location.cell, other.cell])
    assert not (state / "outbox" / "update-0.pb").exists()  # settled by the next message, then deleted
    (feedback,) = (state / "outbox").glob("feedback-*.pt")  # what int8 left out of its last kept update, only
    assert int(feedback.stem.removeprefix("feedback-")) >= kept[-1][0]
    reasons = [row["reason"] for row in report["rejected"]]
    assert report["refused"].get("duplicate", 0) >= 1 and any("duplicate delivery" in r for r in reasons)
