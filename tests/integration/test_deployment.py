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

from geomoe.data.cells import coarsened
from geomoe.sim.export import export_world
from geomoe.sim.world import World
from geomoe.wire.privacy import PrivacyConfig
from geomoe.wire.run_config import to_toml

from .conftest import free_port, small_config, stop

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


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


def flwr_command(connection: str, cfg, tmp_path: Path, extra: str = "", rounds: int = 2) -> list[str]:
    """`flwr run` of this project on `connection` for `rounds` rounds of `cfg`."""
    config_file = tmp_path / "run.toml"
    config_file.write_text(to_toml(cfg))
    overrides = f'config="{config_file}" federation.rounds={rounds} out="{cfg.out}" cache="{cfg.cache}" {extra}'
    return [str(BIN / "flwr"), "run", str(ROOT), connection, "--run-config", overrides.strip(), "--stream"]


def flwr_run(connection: str, cfg, tmp_path: Path, env: dict, extra: str = "") -> tuple[dict, str]:
    """Run it to the end (in its own session); the report and what `flwr run` printed."""
    result = subprocess.run(
        flwr_command(connection, cfg, tmp_path, extra),
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        start_new_session=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((Path(cfg.out) / "report.json").read_text()), result.stdout + result.stderr


@contextmanager
def federation(tmp_path, node_configs: list[str]):
    """A SuperLink and one SuperNode per node config on 127.0.0.1; yields the env for `flwr run`, the nodes and a
    function that starts one more node (a device joining later)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(tmp_path / "flwr-home")}
    link_port = free_port()
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    processes = []

    def add_node(node_config: str) -> subprocess.Popen:
        node_port, log = free_port(), tmp_path / f"supernode{len(processes)}.log"
        node_command = [
            str(BIN / "flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{link_port}",
            "--port",
            str(node_port),
            "--node-config",
            node_config,
        ]
        node = start(node_command, log, env)
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


@pytest.fixture
def deployment(tmp_path):
    """Two SuperNodes at the first two locations of the small run, on the server's world file (same host); the
    third location's node can join later."""
    locations = World(small_config(tmp_path, tmp_path).world).locations
    with federation(tmp_path, [f"lat={loc.lat} lon={loc.lon}" for loc in locations[:2]]) as (env, nodes, add):
        yield env, nodes, locations, add


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


def test_a_node_that_drops_out_does_not_stall_the_round_and_one_that_joins_takes_part(
    tmp_path, model_cache, deployment
):
    """With client-level DP (central noise, int8+zstd uploads) and coarse locations on the deployment runtime: the
    nodes report level-2 cells only, never their coordinates."""
    env, nodes, locations, add_node = deployment
    cfg = small_config(tmp_path / "run", model_cache)
    cfg.federation.round_timeout_s = 75.0  # in the config file: Flower overrides only pyproject's keys
    cfg.federation.upload_compression = "int8+zstd"
    cfg.federation.location_level = 2
    cfg.privacy = PrivacyConfig(clip_norm=1.0, noise_multiplier=0.001, adaptive_clip=True)
    command = flwr_command("test", cfg, tmp_path, "federation.min_nodes=2", rounds=3)
    run = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        checkpoint = Path(cfg.out) / "checkpoint.pt"
        deadline = time.monotonic() + 400
        while not (
            checkpoint.is_file() and torch.load(checkpoint, weights_only=False)["server_state"]["completed_round"]
        ):
            assert time.monotonic() < deadline and run.poll() is None, "round 1 did not complete"
            time.sleep(0.5)
        stop(nodes[1])  # gone in the middle of the run
        add_node(f"lat={locations[2].lat} lon={locations[2].lon}")  # a device switched on after set-up
        output, _ = run.communicate(timeout=400)
    finally:
        stop(run)
    assert run.returncode == 0, output[-3000:]
    report = json.loads((Path(cfg.out) / "report.json").read_text())
    replies = [row["replies"] for row in report["rounds"]]
    # Round 2 may or may not see the newcomer (it registers while round 2 starts); round 3 always does.
    assert replies[0] == 2 and replies[1] in (1, 2) and replies[2] == 2, replies
    coarse, index = coarsened([loc.cell for loc in locations], 2)
    assert coarse[index[2]] in [name.split("~")[0] for name in report["rounds"][2]["sampled"]]  # queried and trained
    assert {loc["cell"] for loc in report["locations"]} <= set(coarse)
    assert report["rounds"][1]["seconds"] < 75 + 60  # waited at most the timeout, then went on
    epsilons = [row["epsilon"] for row in report["rounds"]]
    assert epsilons == sorted(epsilons) and report["privacy"]["epsilon"] == epsilons[-1] > 0
    assert len({row["clip_norm"] for row in report["rounds"]}) == 3  # the adaptive clip moved every round
    assert_no_coordinates(server_side_text(tmp_path, cfg, output), locations)


def test_devices_on_a_superlink_train_on_their_own_labelled_folders(tmp_path, model_cache):
    """Two rounds on a real SuperLink; three SuperNodes hold JPEG folders (`geomoe data export --format folders`).
    One also holds a species the run does not know: reported and left out, and it trains on the rest."""
    cfg = small_config(tmp_path / "run", model_cache)
    export_world(cfg.world, "folders", tmp_path / "devices")
    third = tmp_path / "devices" / "L3"
    shutil.copytree(third / sorted(p.name for p in third.iterdir())[0], third / "Panthera leo")
    (third / "Lynx lynx").mkdir()  # an empty species folder: counted, not an error
    lions = len(list((third / "Panthera leo").iterdir()))
    locations = World(cfg.world).locations
    configs = [
        f'lat={loc.lat} lon={loc.lon} data="{tmp_path / "devices" / f"L{k + 1}"}"' for k, loc in enumerate(locations)
    ]
    with federation(tmp_path, configs) as (env, _, _):
        report, output = flwr_run("test", cfg, tmp_path, env, "federation.min_nodes=3")
    assert_no_coordinates(server_side_text(tmp_path, cfg, output), locations)
    assert [row["replies"] for row in report["rounds"]] == [3, 3]
    by_cell = {loc["cell"]: loc for loc in report["locations"]}
    assert sorted(by_cell) == sorted(loc.cell for loc in locations)  # each device found its cell
    assert all(loc["source"].startswith("folder ") for loc in by_cell.values())
    assert by_cell[locations[2].cell]["unknown_species"] == {"Panthera leo": lions}
    assert by_cell[locations[2].cell]["skipped"] == {"empty species folder 'Lynx lynx'": 1}
    assert by_cell[locations[0].cell]["unknown_species"] == {}
    assert [row["unknown_species_images"] for row in report["rounds"]] == [lions, lions]
    assert report["final_accuracy"] > report["evaluations"]["0"]["accuracy"]
