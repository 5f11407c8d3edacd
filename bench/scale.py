"""`geomoe bench scale`: the simulation at 10, 100 and 1,000 cells on this machine: time per phase, the
framework's share of a round, and the peak memory of every process the run starts.

Each size is one `geomoe sim` run on the synthetic world sized to it (about 200 observations per cell, cells of
at most 100 per species), with a short server pretraining (the benchmark is about the federation, not the
backbone), up to `sampled` cells per round.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from geomoe.bench.processes import PeakMemory  # noqa: E402
from geomoe.sim.simulation import ClientResources, simulate  # noqa: E402
from geomoe.wire.run_config import RunConfig, build_run_config  # noqa: E402

MARK = "GEOMOE_BENCH_SCALE"  # set in the environment of every process a measured run starts
OBSERVATIONS_PER_CELL = 200
SERVER_IMAGES = 3000  # the server's pretraining share, whatever the size
PHASES = ("query", "configure", "train", "server_evaluation", "aggregate")


def scale_config(cells: int, out: Path, rounds: int, sampled: int) -> RunConfig:
    observations = max(6000, OBSERVATIONS_PER_CELL * cells)
    settings = {
        "world.synthetic.num_observations": observations,
        "world.num_locations": cells,
        "world.min_separation_deg": 20.0 if cells <= 6 else 0.0,
        "world.min_examples": 40,
        "world.n_max": 100,
        "world.server_fraction": SERVER_IMAGES / observations,
        "federation.pretrain_epochs": 1,
        "federation.rounds": rounds,
        "federation.clients_per_round": min(cells, sampled),
        "federation.round_timeout_s": 3600.0,
        "out": str(out / f"cells-{cells}"),
        "cache": str(out / f"cells-{cells}" / "cache"),
    }
    return build_run_config(None, {}, [f"{key}={json.dumps(value)}" for key, value in settings.items()])


def summarise(report: dict, memory: PeakMemory, wall_s: float, slots: int) -> dict:
    """Set-up and per-round times (means over rounds), the framework's share of a round and peak memory."""
    rounds = report["rounds"]
    mean = lambda values: sum(values) / max(len(values), 1)  # noqa: E731
    round_s = mean([r["seconds"] for r in rounds])
    phases = {p: mean([r["phases"].get(p, 0.0) for r in rounds]) for p in PHASES}
    compute = mean([r["client_compute_seconds"] for r in rounds]) / slots  # the nodes' own work, run `slots` at once
    return {
        "wall_s": wall_s,
        "setup_s": report["setup"].get("seconds", {}),
        "round_s": round_s,
        "phases_s": phases,
        "replies_per_round": mean([r["replies"] for r in rounds]),
        "client_compute_s": compute,
        "framework_share": max(0.0, 1 - (compute + phases["server_evaluation"]) / max(round_s, 1e-9)),
        "server_evaluation_share": phases["server_evaluation"] / max(round_s, 1e-9),
        "peak_memory_bytes": memory.peak_total,
        "peak_memory_by_process": dict(sorted(memory.peak_by_role.items(), key=lambda kv: -kv[1])),
        "final_accuracy": report["final_accuracy"],
    }


def bench_scale(
    out: Path, cells: list[int], rounds: int, sampled: int, announce: Callable[[str], None] = print
) -> dict:
    """One simulation per size in `cells`; writes `out/bench_scale.json` and `.png` and returns the result."""
    resources = ClientResources.default()
    slots = max(1, (os.cpu_count() or 1) // resources.cpus)
    result: dict = {"rounds": rounds, "sampled_per_round": sampled, "cpus": os.cpu_count(), "sizes": {}}
    for count in cells:
        cfg = scale_config(count, out, rounds, sampled)
        announce(f"{count} cells: {cfg.world.synthetic.num_observations} observations, "
                 f"{cfg.federation.clients_per_round} sampled per round, {rounds} rounds")  # fmt: skip
        mark = uuid.uuid4().hex
        previous = os.environ.get(MARK)
        os.environ[MARK] = mark  # the simulation's processes inherit it: that is how the sampler finds them
        try:
            started = time.monotonic()
            with PeakMemory(MARK, mark) as memory:
                report = simulate(cfg, resources=resources)
            wall_s = time.monotonic() - started
        finally:
            if previous is None:
                del os.environ[MARK]
            else:
                os.environ[MARK] = previous
        result["sizes"][str(count)] = summarise(report, memory, wall_s, slots)
        (out / "bench_scale.json").write_text(json.dumps(result, indent=2))  # each size kept as it finishes
    plot(result, out / "bench_scale.png")
    return result


def plot(result: dict, path: Path) -> None:
    """Left: peak memory of all processes per size. Right: a round's time by phase per size."""
    sizes = list(result["sizes"])
    rows = [result["sizes"][s] for s in sizes]
    fig, (memory, time_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    memory.bar(sizes, [r["peak_memory_bytes"] / 2**30 for r in rows], color="tab:blue")
    memory.axhline(8, color="tab:red", linestyle="--", label="8 GiB")
    memory.set(xlabel="cells", ylabel="peak memory, all processes (GiB, PSS)", title="memory")
    memory.legend()
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        values = [r["phases_s"][phase] for r in rows]
        time_axis.bar(sizes, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    time_axis.set(xlabel="cells", ylabel="seconds per round", title="round time by phase")
    time_axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
