"""The main job on Flower's simulation engine (Ray), end to end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

from geomoe.bench.hostile import HOSTILE_APPS
from geomoe.bench.processes import marked_processes
from geomoe.camera.inference import load_exported
from geomoe.sim.simulation import simulate

from .conftest import SMALL_RUN, free_port, kill_after_checkpoint, small_config

pytestmark = pytest.mark.integration


def test_per_image_routing_learns_with_one_hostile_node_outvoted_by_the_median(tmp_path, model_cache):
    """Mobile V-MoE routing federated (super-classes from the server's dense model, the router loss on the
    nodes), while partition 0 sends its updates x10 (`analysis.hostile`) with int8+zstd uploads and the median
    aggregates; nodes report level-1 cells (coarse locations on the simulation runtime)."""
    cfg = small_config(tmp_path / "image", model_cache, rounds=2)
    cfg.model.routing = "image"
    cfg.federation.aggregator = "median"
    cfg.federation.location_level = 1
    cfg.federation.upload_compression = "int8+zstd"
    cfg.federation.max_row_update_norm = 20.0  # the default refuses an x10 update outright: here the median must act
    report = simulate(cfg, client_app=HOSTILE_APPS["scaled"])
    groups = report["setup"]["superclasses"]
    assert len(groups) == cfg.model.num_classes and set(groups) <= set(range(cfg.model.num_experts))
    assert [row["replies"] for row in report["rounds"]] == [3, 3]
    assert all(len(location["cell"]) <= len("0/1") for location in report["locations"])
    assert report["evaluations"]["2"]["accuracy"] > report["evaluations"]["0"]["accuracy"]
    # Virtual nodes read the base from the server's file; the set-up traffic counts it once per node all the same.
    setup = report["setup"]["traffic"]["0"].values()
    assert len({t["down_by"]["base"] for t in setup}) == 1 and next(iter(setup))["down_by"]["base"] > 1e6
    assert all(t["down_by"].get("base", 0) == 0 for row in report["rounds"] for t in row["traffic"].values())
    for row in report["rounds"]:  # where a round's time goes, and what the nodes spent computing
        assert set(row["phases"]) == {"query", "configure", "train", "server_evaluation", "aggregate"}
        assert row["client_compute_seconds"] > 0 and sum(row["phases"].values()) <= row["seconds"] + 1e-6
    assert {"world", "initial_model", "query_0"} <= set(report["setup"]["seconds"])


def sim_command(out, model_cache) -> list[str]:
    overrides = [a for item in SMALL_RUN for a in ("--set", item)]
    return [sys.executable, "-m", "geomoe.cli", "sim", "--rounds", "2", "--out", str(out),
            "--set", f'cache="{model_cache}"', *overrides]  # fmt: skip


def test_resume_after_a_kill_gives_the_same_model(tmp_path, model_cache):
    """The uninterrupted run goes through `geomoe sim` as a user runs it: a clean console (no warning text from
    Flower, Ray or Python; the summary table once)."""
    uninterrupted = tmp_path / "straight"
    straight = subprocess.run(sim_command(uninterrupted, model_cache), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    console = straight.stdout + straight.stderr
    for noise in ("warn", "deprecat", "INFO", "Traceback", "Successfully"):
        assert noise.lower() not in console.lower(), console
    assert console.count("geomoe expert: 2 rounds") == 1
    assert "round 1/2: 3 replies" in console and "round 2/2: 3 replies" in console
    assert "final accuracy" in straight.stdout

    killed = tmp_path / "killed"
    kill_after_checkpoint(sim_command(killed, model_cache), killed)

    simulate(small_config(killed, model_cache, rounds=2), resume=True)
    a = torch.load(uninterrupted / "checkpoint.pt", weights_only=False)
    b = torch.load(killed / "checkpoint.pt", weights_only=False)
    assert b["server_state"]["completed_round"] == 2
    for key, value in a["model_state"].items():
        torch.testing.assert_close(b["model_state"][key], value, rtol=0, atol=1e-6, msg=key)
    assert json.loads((killed / "report.json").read_text())["rounds"][1]["round"] == 2

    # A cell of the finished run, pruned and exported for a camera, names species as the run's dataset does.
    cell = json.loads((uninterrupted / "report.json").read_text())["locations"][0]["cell"]
    geomoe = [sys.executable, "-m", "geomoe.cli"]
    for args in (
        ["prune", "--run", str(uninterrupted), "--cell", cell, "--out", str(tmp_path / "cell.pt")],
        ["device", "export", "--model", str(tmp_path / "cell.pt"), "--out", str(tmp_path / "cell.ts")],
    ):
        step = subprocess.run([*geomoe, *args], capture_output=True, text=True, timeout=300)
        assert step.returncode == 0, step.stderr[-2000:]  # fmt: skip
    labels = load_exported(tmp_path / "cell.ts").labels
    assert labels.species == a["species"] and len(a["species"]) == small_config(killed, model_cache).model.num_classes


def test_sim_runs_its_clients_on_a_ray_cluster_started_apart(tmp_path, model_cache):
    """The documented cluster path: `ray start --head` on 127.0.0.1 (its own processes, its own ports), then
    `geomoe sim --ray-address` against it; the virtual clients run in that cluster's workers."""
    ray = str(Path(sys.executable).parent / "ray")
    mark = uuid.uuid4().hex  # the head's processes carry it: this test stops them and no other Ray on the machine
    env = {**os.environ, "RAY_HEAD_MARK": mark, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    port, client_port = free_port(), free_port()
    temp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    head = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
            f"--ray-client-server-port={client_port}", "--include-dashboard=false", f"--temp-dir={temp}"]  # fmt: skip
    started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        result = subprocess.run(
            [*sim_command(tmp_path / "cluster", model_cache), "--rounds", "1", "--ray-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((tmp_path / "cluster" / "report.json").read_text())
        assert [row["replies"] for row in report["rounds"]] == [3]
        # The clients ran in the head's workers (with an address, Ray only connects): their logs are the head's.
        logs = [path.read_text(errors="replace") for path in temp.glob("session_*/logs/worker-*")]
        assert any(":actor_name:ClientAppActor" in text for text in logs), f"{len(logs)} worker logs, no client"
    finally:
        for pid in marked_processes("RAY_HEAD_MARK", mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)  # with the head's address file: no later ray.init() finds it
