"""Integration fixtures: a small run configuration and a shared cache of its initial model."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

from geomoe.bench.processes import marked_processes
from geomoe.wire.run_config import RunConfig

SMALL_RUN = [
    "world.synthetic.num_observations=3000",
    "world.num_locations=3",
    "world.n_max=300",
    "federation.pretrain_epochs=3",
    "model.num_experts=8",
]


def small_config(out, cache, strategy: str = "expert", rounds: int = 2) -> RunConfig:
    from geomoe.wire.run_config import set_override

    cfg = RunConfig(out=str(out), cache=str(cache))
    for item in SMALL_RUN:
        key, value = item.split("=")
        cfg = set_override(cfg, key, value)
    cfg = set_override(cfg, "federation.strategy", f'"{strategy}"')
    cfg = set_override(cfg, "federation.rounds", str(rounds))
    return cfg


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("initial-models")


SESSION_MARK = ("GEOMOE_TEST_SESSION", uuid.uuid4().hex)  # inherited by every process this session starts


def session_processes() -> list[int]:
    """Processes whose environment carries this session's mark: what its tests started, however deep (SuperLink
    -> SuperExec -> ServerApp) and even after their parent died."""
    return marked_processes(*SESSION_MARK)


@pytest.fixture(scope="session", autouse=True)
def kill_leftover_children():
    """Whatever a failed test left running (SuperLink, SuperNodes, Ray) is stopped at the end: only this session's
    processes, never those of another test run on the same machine (CI beside a developer's run)."""
    os.environ[SESSION_MARK[0]] = SESSION_MARK[1]
    yield
    for pid in session_processes():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def kill_after_checkpoint(command: list[str], out: Path, rounds_done: int = 1) -> None:
    """Run `command` (a `geomoe sim`), and SIGKILL its whole process group once `out/checkpoint.pt` records
    `rounds_done` completed rounds (async: aggregations): a crash mid-run, after a checkpoint."""
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900  # bounds a hang; a loaded machine may pretrain for minutes first
        while time.monotonic() < deadline:
            checkpoint = out / "checkpoint.pt"
            if (
                checkpoint.is_file()
                and torch.load(checkpoint, weights_only=False)["server_state"]["completed_round"] >= rounds_done
            ):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the run wrote no checkpoint of {rounds_done} rounds in time")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        stop(process)
    assert not (out / "report.json").exists(), "the run finished before it was killed"
