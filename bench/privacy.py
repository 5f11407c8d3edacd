"""`geomoe bench privacy`: what privacy and robustness cost in accuracy, on one world, seed and initial model.

Two questions, one JSON and one figure. (1) Accuracy against epsilon: client-level DP runs at several noise
multipliers (adaptive clipping, central noise), beside the same run without DP. (2) Accuracy when one node of the
federation is hostile (its updates scaled or sign-flipped, `analysis.hostile`), for the plain mean and the
robust aggregators, beside honest runs of each aggregator (what robustness costs when nobody attacks).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from geomoe.bench.hostile import ATTACK_FACTORS, HOSTILE_APPS  # noqa: E402
from geomoe.wire.privacy import PrivacyConfig  # noqa: E402
from geomoe.wire.run_config import AGGREGATORS, RunConfig  # noqa: E402

NOISE_MULTIPLIERS = (0.03, 0.1, 0.3)
CLIP_NORM = 1.0  # starting clip; adaptive clipping moves it to the median update norm


@dataclass
class PrivacyRun:
    """One run of the benchmark: its settings besides the shared base config."""

    aggregator: str = "mean"
    attack: str = "honest"  # or a key of ATTACK_FACTORS: partition 0 corrupts its updates
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


def privacy_runs(noise_multipliers: tuple[float, ...], attacks: tuple[str, ...], aggregators: tuple[str, ...]):
    """name -> PrivacyRun: the plain run, one DP run per noise multiplier, each aggregator honest and attacked."""
    for attack in attacks:
        if attack not in ATTACK_FACTORS:
            raise ValueError(f"unknown attack {attack!r}: choose from {', '.join(ATTACK_FACTORS)}")
    for aggregator in aggregators:
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}: choose from {', '.join(AGGREGATORS)}")
    runs = {"plain": PrivacyRun()}
    for z in noise_multipliers:
        private = PrivacyConfig(clip_norm=CLIP_NORM, noise_multiplier=z, adaptive_clip=True)
        runs[f"dp-z{z:g}"] = PrivacyRun(privacy=private)
    for attack in ("honest", *attacks):
        for aggregator in aggregators:
            if (attack, aggregator) != ("honest", "mean"):  # that is the plain run
                runs[f"{attack}-{aggregator}"] = PrivacyRun(aggregator=aggregator, attack=attack)
    return runs


def bench_privacy(
    out: Path,
    base: RunConfig,
    noise_multipliers: tuple[float, ...] = NOISE_MULTIPLIERS,
    attacks: tuple[str, ...] = tuple(ATTACK_FACTORS),
    aggregators: tuple[str, ...] = AGGREGATORS,
    announce: Callable[[str], None] = print,
) -> dict:
    """Run the matrix on `base` (one cache: one world and initial model for all); writes
    `out/bench_privacy.json` and `out/bench_privacy.png` and returns the JSON."""
    from geomoe.sim import simulation

    reports = {}
    for name, run in privacy_runs(noise_multipliers, attacks, aggregators).items():
        cfg = replace(base, out=str(out / name), cache=str(out / "cache"), privacy=run.privacy)
        cfg.federation = replace(base.federation, aggregator=run.aggregator)
        announce(f"{name}: aggregator {run.aggregator}, {run.attack}, noise multiplier {run.privacy.noise_multiplier}")
        client_app = HOSTILE_APPS.get(run.attack, simulation.CLIENT_APP)
        reports[name] = simulation.simulate(cfg, client_app=client_app)
    result = summarise(reports, noise_multipliers, attacks, aggregators)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_privacy.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "bench_privacy.png")
    return result


def server_accuracy(report: dict) -> float | None:
    """The global model's accuracy on the server's test images (every species) after the last round; None where the
    run had none. Under DP it can fall far below the nodes' accuracy: a node scores the rows of its own species, and
    noise lands hardest on the species rows that few nodes hold."""
    return report["evaluations"][str(len(report["rounds"]))].get("server_accuracy")


def summarise(reports: dict[str, dict], noise_multipliers, attacks, aggregators) -> dict:
    plain = reports["plain"]
    dp = [
        {
            "noise_multiplier": z,
            "epsilon": reports[f"dp-z{z:g}"]["privacy"]["epsilon"],
            "delta": reports[f"dp-z{z:g}"]["privacy"]["delta"],
            "final_accuracy": reports[f"dp-z{z:g}"]["final_accuracy"],
            "final_server_accuracy": server_accuracy(reports[f"dp-z{z:g}"]),
            "final_clip_norm": reports[f"dp-z{z:g}"]["rounds"][-1]["clip_norm"],
        }
        for z in noise_multipliers
    ]

    def name(attack: str, aggregator: str) -> str:
        return "plain" if (attack, aggregator) == ("honest", "mean") else f"{attack}-{aggregator}"

    robustness = {
        attack: {aggregator: reports[name(attack, aggregator)]["final_accuracy"] for aggregator in aggregators}
        for attack in ("honest", *attacks)
    }
    rejected = {run: len(report.get("rejected", [])) for run, report in reports.items()}
    return {
        "nodes": len(plain["locations"]),
        "rounds": len(plain["rounds"]),
        "initial_accuracy": plain["evaluations"]["0"]["accuracy"],
        "no_dp_accuracy": plain["final_accuracy"],
        "no_dp_server_accuracy": server_accuracy(plain),
        "dp": dp,
        "attack_factors": {attack: ATTACK_FACTORS[attack] for attack in attacks},
        "robustness": robustness,
        "rejected_replies": rejected,
    }


def compares_aggregators(result: dict) -> bool:
    """Whether the run compared aggregators or attacks (else its robustness part is the plain run alone)."""
    attacks = list(result["robustness"])
    return len(attacks) > 1 or len(result["robustness"][attacks[0]]) > 1


def plot(result: dict, path: Path) -> None:
    """Left: final accuracy against epsilon (log scale), on the nodes' own species and on the server's test images,
    the runs without DP as lines. Right, where the run compared aggregators or attacks: final accuracy per
    aggregator, honest and under each attack."""
    compared = compares_aggregators(result)
    figure, axes = plt.subplots(1, 2 if compared else 1, figsize=(11 if compared else 6, 4), squeeze=False)
    left = axes[0][0]
    points = sorted((row["epsilon"], row["final_accuracy"], row["noise_multiplier"]) for row in result["dp"])
    left.plot([p[0] for p in points], [p[1] for p in points], "o-", color="C0", label="client-level DP, nodes")
    for epsilon, accuracy, z in points:
        left.annotate(f"z={z:g}", (epsilon, accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    left.axhline(result["no_dp_accuracy"], color="C0", linestyle="--", alpha=0.6, label="no DP, nodes")
    server = sorted((row["epsilon"], row["final_server_accuracy"]) for row in result["dp"])
    if result["no_dp_server_accuracy"] is not None and all(accuracy is not None for _, accuracy in server):
        left.plot([p[0] for p in server], [p[1] for p in server], "s-", color="C1", label="client-level DP, server")
        left.axhline(result["no_dp_server_accuracy"], color="C1", linestyle="--", alpha=0.6, label="no DP, server")
    left.axhline(result["initial_accuracy"], color="grey", linestyle=":", label="nodes before training")
    left.set_xscale("log")
    delta = f" (delta = {result['dp'][0]['delta']:g})" if result["dp"] else ""
    left.set(xlabel=f"epsilon{delta}", ylabel="final accuracy", title=f"accuracy vs privacy, {result['nodes']} nodes")
    left.legend(fontsize=8)
    if compared:
        right = axes[0][1]
        attacks = list(result["robustness"])
        aggregators = list(result["robustness"][attacks[0]])
        width = 0.8 / len(aggregators)
        for k, aggregator in enumerate(aggregators):
            xs = [i + k * width for i in range(len(attacks))]
            right.bar(xs, [result["robustness"][a][aggregator] for a in attacks], width, label=aggregator)
        right.set_xticks([i + width * (len(aggregators) - 1) / 2 for i in range(len(attacks))], attacks)
        right.set(ylabel="final accuracy", title=f"1 hostile node of {result['nodes']}")
        right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
