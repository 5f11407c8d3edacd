"""`geomoe bench links`: synchronous rounds against buffered asynchronous aggregation on one world, seed and initial
model, under field availability traces, on the simulated clock.

The traces: always online; two 30-minute windows a day for every node (local solar time, LTE-M); a LoRa-class duty
cycle (online in 1% of the hours, LoRa link with a 10 kB budget per window: nodes upload int8+zstd and tighten a
top-k to fit the budget, or defer). Per run: the server's accuracy (the global model on the clients' test images)
against simulated hours and against bytes moved; the simulated hours and bytes to reach the target (the settled
accuracy of synchronous rounds always online, reached when three evaluations in a row average it); the accuracy
after one simulated week; updates refused as stale (async), node-hours trained and never aggregated (sync), and
updates compressed or deferred to fit the link budget.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import matplotlib

from geomoe.wire.run_config import RunConfig, set_override

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WEEK_H = 168.0
SMOOTHING = 3  # consecutive evaluations whose mean must reach the target
TRACES = {
    "always": {"world.availability": '"always"'},
    "windows": {"world.availability": '"daily:6-6.5,18-18.5"', "world.link": '"lte-m"'},
    "lora": {
        "world.availability": '"duty:0.01"',
        "world.link": '"lora@10kB"',
        "federation.upload_compression": '"int8+zstd"',
    },
}


def device_speed_for(base: RunConfig, train_minutes: float) -> float:
    """The `world.device_speed` at which the median node's local training takes `train_minutes` simulated minutes
    (a field device's training is minutes, not this machine's seconds)."""
    from geomoe.world.world import World

    sizes = sorted(len(location.train) for location in World(base.world).locations)
    median = sizes[len(sizes) // 2]
    return train_minutes * 60 / (median * base.train.epochs * base.world.seconds_per_example)


def bench_links(
    out: Path,
    base: RunConfig,
    sync_rounds: int,
    async_aggregations: int,
    train_minutes: float,
    announce: Callable[[str], None] = print,
) -> dict:
    """Both modes under every trace (one cache: one world and initial model), devices training `train_minutes`
    simulated minutes; writes `out/bench_links.json` and `out/bench_links.png` and returns the JSON."""
    from geomoe.sim.simulation import simulate

    base = set_override(base, "world.device_speed", repr(device_speed_for(base, train_minutes)))
    announce(f"devices train {train_minutes:g} simulated minutes (world.device_speed = {base.world.device_speed:.3g})")
    reports = {}
    for trace, overrides in TRACES.items():
        for mode, rounds in (("sync", sync_rounds), ("async", async_aggregations)):
            cfg = replace(base, out=str(out / f"{mode}-{trace}"), cache=str(out / "cache"))
            for key, value in {**overrides, "federation.mode": f'"{mode}"', "federation.rounds": str(rounds)}.items():
                cfg = set_override(cfg, key, value)
            if cfg.federation.max_sim_hours is None:
                cfg = set_override(cfg, "federation.max_sim_hours", str(WEEK_H))
            steps = "rounds" if mode == "sync" else "aggregations"
            announce(f"{mode} under {trace}: {cfg.world.availability} over {cfg.world.link}, at most {rounds} {steps} "
                     f"or {cfg.federation.max_sim_hours:g} simulated hours")  # fmt: skip
            reports[(mode, trace)] = simulate(cfg)
    result = summarise(reports, base) | {"train_minutes": train_minutes}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_links.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "bench_links.png")
    return result


def curve(report: dict) -> list[dict]:
    """(simulated hours, cumulative bytes, server accuracy) at each evaluation of a run, in order."""
    rows = {row["round"]: row for row in report["rounds"]}
    setup = sum(t["down"] + t["up"] for step in report["setup"]["traffic"].values() for t in step.values())
    points, moved = [], setup
    done = 0
    for version in sorted(int(k) for k in report["evaluations"]):
        for r in range(done + 1, version + 1):
            if r in rows:
                moved += sum(t["down"] + t["up"] for t in rows[r]["traffic"].values())
        done = version
        evaluation = report["evaluations"][str(version)]
        hours = evaluation.get("sim_hours")
        if hours is None:
            hours = rows[version]["sim_hours"] if version in rows else 0.0
        if evaluation.get("server_accuracy") is not None:
            points.append({"version": version, "sim_hours": hours, "bytes": moved,
                           "server_accuracy": evaluation["server_accuracy"]})  # fmt: skip
    return points


def plateau(points: list[dict]) -> float:
    """A run's settled accuracy: the mean of the last third of its evaluations (at least one). One evaluation on a
    few hundred test images moves by a few points from one to the next, so a single one is no target."""
    tail = points[-max(1, len(points) // 3) :]
    return sum(p["server_accuracy"] for p in tail) / len(tail)


def reached(points: list[dict], target: float) -> dict | None:
    """The first evaluation at which the mean of the last `SMOOTHING` evaluations (fewer at the start) is at or above
    `target`: a run reaches the target when it stays there, not when one noisy evaluation touches it."""
    for index, point in enumerate(points):
        window = points[max(0, index - SMOOTHING + 1) : index + 1]
        if len(window) == SMOOTHING and sum(p["server_accuracy"] for p in window) / SMOOTHING >= target - 1e-9:
            return point
    return None


def summarise(reports: dict[tuple[str, str], dict], base: RunConfig) -> dict:
    curves = {f"{mode}-{trace}": curve(report) for (mode, trace), report in reports.items()}
    target = plateau(curves["sync-always"])
    runs = {}
    for (mode, trace), report in reports.items():
        name = f"{mode}-{trace}"
        points = curves[name]
        hit = reached(points, target)
        week = [p for p in points if p["sim_hours"] <= WEEK_H]
        runs[name] = {
            "mode": mode,
            "trace": trace,
            "aggregations": len(report["rounds"]),
            "updates_aggregated": sum(row["replies"] for row in report["rounds"]),
            "sim_hours": points[-1]["sim_hours"] if points else None,
            "hours_to_target": hit["sim_hours"] if hit else None,
            "bytes_to_target": hit["bytes"] if hit else None,
            "accuracy_after_a_week": week[-1]["server_accuracy"] if week else None,
            "final_server_accuracy": points[-1]["server_accuracy"] if points else None,
            "refused_stale": report.get("refused", {}).get("stale", 0),
            "refused": report.get("refused", {}),
            "wasted_node_hours": sum(row.get("wasted_node_hours", 0.0) for row in report["rounds"]),
            "link_compressed": sum(row.get("link", {}).get("compressed", 0) for row in report["rounds"]),
            "link_deferred": sum(row.get("link", {}).get("deferred", 0) for row in report["rounds"]),
            "stopped": report["privacy"]["stopped"] or None,
            "curve": points,
        }
    return {
        "target_accuracy": target,
        "target_from": f"sync-always: the mean of the last third of its evaluations; reached when the mean of "
        f"{SMOOTHING} consecutive evaluations is at or above it",
        "nodes": len(reports[("sync", "always")]["locations"]),
        "device_speed": base.world.device_speed,
        "buffer_size": base.federation.buffer_size,
        "round_timeout_s": base.federation.round_timeout_s,
        "traces": {trace: {k.split(".")[-1]: json.loads(v) for k, v in o.items()} for trace, o in TRACES.items()},
        "runs": runs,
    }


def plot(result: dict, path: Path) -> None:
    """Per trace: server accuracy against simulated hours (left) and against megabytes moved (right), sync dashed,
    async solid; the target as a grey line."""
    figure, (hours, megabytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, trace in enumerate(result["traces"]):
        for mode, style in (("sync", "--"), ("async", "-")):
            points = result["runs"][f"{mode}-{trace}"]["curve"]
            label = f"{mode}, {trace}"
            hours.plot([p["sim_hours"] for p in points], [p["server_accuracy"] for p in points], style,
                       color=f"C{index}", marker="o", markersize=3, label=label)  # fmt: skip
            megabytes.plot([p["bytes"] / 1e6 for p in points], [p["server_accuracy"] for p in points], style,
                           color=f"C{index}", marker="o", markersize=3, label=label)  # fmt: skip
    for axis in (hours, megabytes):
        axis.axhline(result["target_accuracy"], color="grey", linestyle=":", label="target (sync, always on)")
        axis.set_ylabel("server accuracy")
    hours.set(xlabel="simulated hours", xscale="symlog", title=f"{result['nodes']} nodes: accuracy over time")
    megabytes.set(xlabel="MB moved (both ways)", title="accuracy against bytes")
    hours.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
