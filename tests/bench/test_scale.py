"""`geomoe bench scale`: the sizes' configs, the memory sampler on real processes, and the round summary."""

import subprocess
import sys
import time
import uuid

import pytest

from geomoe.bench.processes import PeakMemory, marked_processes
from geomoe.bench.scale import scale_config, summarise

HOLD_200_MB = "import time; block = bytearray(200 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(30)"


def test_each_size_samples_at_most_the_asked_cells_from_a_world_of_that_size(tmp_path):
    cfg = scale_config(1000, tmp_path, rounds=2, sampled=100)
    assert cfg.world.num_locations == 1000 and cfg.federation.clients_per_round == 100
    assert cfg.world.synthetic.num_observations == 200_000
    assert cfg.world.server_fraction * cfg.world.synthetic.num_observations == pytest.approx(3000)
    assert scale_config(10, tmp_path, rounds=2, sampled=100).federation.clients_per_round == 10


def test_the_sampler_counts_marked_processes_only(monkeypatch):
    mark = uuid.uuid4().hex
    marked = subprocess.Popen([sys.executable, "-c", HOLD_200_MB], env={"BENCH_MARK": mark})
    unmarked = subprocess.Popen([sys.executable, "-c", HOLD_200_MB])
    try:
        memory = PeakMemory("BENCH_MARK", mark)
        deadline = time.monotonic() + 120  # until the child has touched its block (slow on a loaded machine)
        while memory.peak_total <= 200 * 2**20 and time.monotonic() < deadline:
            memory.sample()
            time.sleep(0.1)
        assert marked_processes("BENCH_MARK", mark) == [marked.pid]
        assert 200 * 2**20 < memory.peak_total < 200 * 2**20 + memory.peak_by_role["driver"] + 100 * 2**20
    finally:
        marked.kill(), unmarked.kill()


def test_the_framework_share_is_what_the_nodes_did_not_spend_computing():
    phases = {"query": 1.0, "configure": 0.5, "train": 16.0, "server_evaluation": 2.0, "aggregate": 0.5}
    report = {
        "rounds": [{"seconds": 20.0, "phases": phases, "client_compute_seconds": 28.0, "replies": 10}] * 2,
        "setup": {"seconds": {"world": 1.0, "initial_model": 9.0}},
        "final_accuracy": 0.5,
    }
    memory = PeakMemory("BENCH_MARK", "unused")
    memory.peak_total, memory.peak_by_role = 3 * 2**30, {"driver": 2**30, "raylet": 2 * 2**30}
    row = summarise(report, memory, wall_s=60.0, slots=2)
    assert row["client_compute_s"] == 14.0  # 28 s of node work on 2 slots at once
    assert row["framework_share"] == pytest.approx(1 - (14 + 2) / 20)
    assert row["server_evaluation_share"] == pytest.approx(0.1) and row["peak_memory_bytes"] == 3 * 2**30
    assert list(row["peak_memory_by_process"]) == ["raylet", "driver"]
