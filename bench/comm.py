"""`geomoe bench comm`: dense FedAvg, FedProx and per-expert runs of one world, compared by upload and accuracy."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from geomoe.analysis.comm_report import compare_strategies
from geomoe.wire.run_config import RunConfig

FEDPROX_MU = 0.01  # FedProx's proximal weight in the baseline (Li et al. 2020 use 0.001 to 1)


def comm_variants(compressed: str) -> dict[str, tuple[str, str, str, float]]:
    """The runs `bench comm` compares: name -> (strategy, trainable, upload pipeline, FedProx mu). Full-model
    FedAvg; dense FedAvg and FedProx of the same parts the per-expert runs train (every expert and the whole
    head), so the gain of slicing by location shows on its own; per-expert, plain and compressed."""
    return {
        "fedavg": ("fedavg", "all", "none", 0.0),
        "fedavg-parts": ("fedavg", "experts+head", "none", 0.0),
        "fedprox-parts": ("fedavg", "experts+head", "none", FEDPROX_MU),
        "expert": ("expert", "experts+head", "none", 0.0),
        "expert-compressed": ("expert", "experts+head", compressed, 0.0),
    }


def bench_comm(out: Path, rounds: int, compressed: str, seed: int, announce: Callable[[str], None] = print) -> dict:
    """The `comm_variants` runs on the same partitions, seed and initial model (one shared cache); writes
    `out/bench_comm.json` and returns it."""
    from geomoe.sim.simulation import simulate

    reports = {}
    for name, (strategy, trainable, codec, mu) in comm_variants(compressed).items():
        cfg = RunConfig(out=str(out / name), cache=str(out / "cache"), seed=seed)
        cfg.federation = replace(
            cfg.federation, strategy=strategy, trainable=trainable, rounds=rounds, upload_compression=codec
        )
        cfg.train = replace(cfg.train, prox_mu=mu)
        announce(f"{name}: {strategy} of {trainable}, upload {codec}, FedProx mu {mu:g}, {rounds} rounds")
        reports[name] = simulate(cfg)
    result = {**compare_strategies(reports), "compressed_pipeline": compressed}
    (out / "bench_comm.json").write_text(json.dumps(result, indent=2))
    return result
