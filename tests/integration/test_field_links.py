"""Devices online only sometimes, on Flower's simulation engine: buffered asynchronous aggregation under an
availability trace (half the nodes online twice a day), and resume after a kill in async mode."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from geomoe.bench.hostile import HOSTILE_APPS
from geomoe.sim.simulation import simulate

from .conftest import SMALL_RUN, kill_after_checkpoint, small_config

pytestmark = pytest.mark.integration

FIELD = {
    "federation.mode": '"async"',
    "federation.buffer_size": "2",
    "federation.eval_every": "2",
    "federation.max_staleness": "1",
    "world.availability": '"daily:6-6.5,18-18.5"',
    "world.availability_share": "0.5",
    "world.link": '"lte-m"',
    "world.device_speed": "10",
}


def field_config(out, model_cache, rounds: int):
    from geomoe.wire.run_config import set_override

    cfg = small_config(out, model_cache, rounds=rounds)
    for key, value in FIELD.items():
        cfg = set_override(cfg, key, value)
    return cfg


def test_async_learns_with_half_the_nodes_online_twice_a_day_and_counts_a_replayed_update_once(tmp_path, model_cache):
    """Partition 0 answers every train message after its first with that first update again (a store-and-forward
    node whose acknowledgements are lost): the server refuses each resend and aggregates the update once. At
    max_staleness 0, the windowed nodes' updates that other nodes' aggregations made stale are refused as stale (the
    world's seed fixes which nodes are windowed and what they hold)."""
    from geomoe.wire.run_config import set_override

    cfg = set_override(field_config(tmp_path / "async", model_cache, rounds=8), "federation.max_staleness", "0")
    report = simulate(cfg, client_app=HOSTILE_APPS["replaying"])
    evaluations = report["evaluations"]
    assert [row["round"] for row in report["rounds"]] == list(range(1, 9))
    assert all(row["replies"] <= 2 for row in report["rounds"])  # a buffer of two accepted updates
    assert evaluations["8"]["accuracy"] > evaluations["0"]["accuracy"]
    hours = [row["sim_hours"] for row in report["rounds"]]
    assert hours == sorted(hours) and hours[-1] > 1  # the windowed nodes are first online hours into the run
    assert report["sim_hours"] >= hours[-1]
    assert report["staleness"]["max"] == 0  # only fresh updates are taken at max_staleness 0
    refused = report["refused"]  # every refusal counted by kind, and each one's reason logged in the report
    reasons = [row["reason"] for row in report["rejected"]]
    assert sum("max_staleness" in reason for reason in reasons) == refused.get("stale", 0) >= 1
    updates = [(name, version) for row in report["rounds"] for name, version, _ in row["updates"]]
    assert len(updates) == len(set(updates))  # no update counted twice
    replayer = report["locations"][0]["name"]  # partition 0: the report lists nodes by location
    assert [version for name, version in updates if name == replayer] == [0]
    assert refused.get("duplicate", 0) >= 1 and sum("duplicate delivery" in reason for reason in reasons) >= 1


def test_async_resume_after_a_kill_gives_the_same_model(tmp_path, model_cache):
    straight = simulate(field_config(tmp_path / "straight", model_cache, rounds=6))
    killed = tmp_path / "killed"
    overrides = [a for item in SMALL_RUN for a in ("--set", item)]
    overrides += [a for key, value in FIELD.items() for a in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "geomoe.cli", "sim", "--rounds", "6", "--out", str(killed),
               "--set", f'cache="{model_cache}"', *overrides]  # fmt: skip
    kill_after_checkpoint(command, killed)
    state = torch.load(killed / "checkpoint.pt", weights_only=False)["server_state"]
    assert 0 < state["completed_round"] < 6 and state["buffered"]["out"]  # messages out at the checkpoint

    simulate(field_config(killed, model_cache, rounds=6), resume=True)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(killed / "checkpoint.pt", weights_only=False)
    for key, value in a["model_state"].items():
        torch.testing.assert_close(b["model_state"][key], value, rtol=0, atol=1e-6, msg=key)
    resumed = json.loads((killed / "report.json").read_text())
    assert [row["sampled"] for row in resumed["rounds"]] == [row["sampled"] for row in straight["rounds"]]
    assert resumed["sim_hours"] == pytest.approx(straight["sim_hours"])
