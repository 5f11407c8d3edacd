"""`geomoe comm report`: communication cost of runs side by side, as a table, a CSV and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from geomoe.world.links import LinkProfile  # noqa: E402


def load_report(run_dir: Path) -> dict:
    path = run_dir / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no report (has the run finished?)")
    report = json.loads(path.read_text())
    for field in ("rounds", "evaluations", "strategy", "config"):
        if field not in report:
            raise ValueError(f"{path}: missing field '{field}'")
    return report


def run_label(run_dir: Path, report: dict) -> str:
    fed = report["config"]["federation"]
    codec = fed.get("upload_compression", "none")
    return f"{run_dir.name} ({report['strategy']}{'' if codec == 'none' else ', up ' + codec})"


def summarise_run(run_dir: Path, report: dict, links: list[LinkProfile]) -> dict:
    """Per-client-per-round MB up and down, totals, accuracy, accuracy per MB and link times."""
    rounds = report["rounds"]
    entries = [t for row in rounds for t in row["traffic"].values()]
    n = max(len(entries), 1)
    up, down = sum(t["up"] for t in entries), sum(t["down"] for t in entries)
    clients = max((len(row["traffic"]) for row in rounds), default=1)
    accuracy = report.get("final_accuracy") or 0.0
    row = {
        "run": run_label(run_dir, report),
        "strategy": report["strategy"],
        "rounds": len(rounds),
        "up_mb_per_client_round": up / n / 1e6,
        "down_mb_per_client_round": down / n / 1e6,
        "total_mb": (up + down) / 1e6,
        "accuracy": accuracy,
        "accuracy_per_upload_mb": accuracy / max(up / clients / 1e6, 1e-9),
    }
    for link in links:
        row[f"{link.name}_s_per_round"] = link.seconds((up + down) / n, messages=2)
        if link.energy_j_per_byte:
            row[f"{link.name}_j_per_round"] = link.joules((up + down) / n, messages=2)
    return row


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(reports: dict[str, dict], path: Path) -> None:
    """Left: accuracy against cumulative upload MB per client. Right: upload per client, last round."""
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    for label, report in reports.items():
        points = accuracy_by_upload(report)
        curves.plot([p[0] / 1e6 for p in points], [p[1] for p in points], marker="o", label=label)
    curves.set(xlabel="cumulative upload per client (MB)", ylabel="accuracy", title="accuracy vs upload")
    curves.set_xscale("symlog", linthresh=0.1)
    curves.legend(fontsize=8)
    width = 0.8 / max(len(reports), 1)
    cells = sorted({c for r in reports.values() for c in r["rounds"][-1]["traffic"]}) if reports else []
    for i, (label, report) in enumerate(reports.items()):
        traffic = report["rounds"][-1]["traffic"]
        bars.bar(
            [j + i * width for j in range(len(cells))],
            [traffic.get(c, {}).get("up", 0) / 1e3 for c in cells],
            width,
            label=label,
        )
    bars.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))], cells, rotation=45, fontsize=8)
    bars.set(ylabel="upload in the last round (kB)", title="per-client upload", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def upload_per_client_round(report: dict) -> float:
    """Mean bytes one client uploads in one round."""
    values = [t["up"] for row in report["rounds"] for t in row["traffic"].values()]
    return sum(values) / max(len(values), 1)


def accuracy_by_upload(report: dict) -> list[tuple[float, float]]:
    """(cumulative upload bytes per client, accuracy of the model after that much upload), round 0 first."""
    points, total = [], 0.0
    evaluations = report["evaluations"]
    if "0" in evaluations:
        points.append((0.0, evaluations["0"]["accuracy"]))
    for row in report["rounds"]:
        total += sum(t["up"] for t in row["traffic"].values()) / max(len(row["traffic"]), 1)
        if str(row["round"]) in evaluations:
            points.append((total, evaluations[str(row["round"])]["accuracy"]))
    return points


def accuracy_at_budget(points: list[tuple[float, float]], budget: float) -> float:
    """Best accuracy reached with at most `budget` bytes uploaded per client."""
    return max(acc for spent, acc in points if spent <= budget)


def compare_strategies(reports: dict[str, dict]) -> dict:
    """Upload ratios to full-model FedAvg (`reports["fedavg"]`) and, when run, to dense FedAvg of the same
    trainable parts (`reports["fedavg-parts"]`: what slicing by location saves on its own), and accuracy at
    equal upload, for every run."""
    dense_points = accuracy_by_upload(reports["fedavg"])
    budget = dense_points[1][0]  # what dense FedAvg uploads per client in its first round
    dense_upload = upload_per_client_round(reports["fedavg"])
    ratios = {}
    if "fedavg-parts" in reports:
        parts_upload = upload_per_client_round(reports["fedavg-parts"])
        ratios["upload_ratio_to_fedavg_parts"] = {
            name: upload_per_client_round(r) / parts_upload for name, r in reports.items()
        }
    return {
        "upload_per_client_round": {name: upload_per_client_round(r) for name, r in reports.items()},
        "upload_ratio_to_fedavg": {name: upload_per_client_round(r) / dense_upload for name, r in reports.items()},
        **ratios,
        "final_accuracy": {name: r["final_accuracy"] for name, r in reports.items()},
        "equal_upload_budget_bytes": budget,
        "accuracy_at_equal_upload": {
            name: accuracy_at_budget(accuracy_by_upload(r), budget) for name, r in reports.items()
        },
        "curves": {name: accuracy_by_upload(r) for name, r in reports.items()},
    }
