"""`geomoe comm report`: communication cost of runs side by side, as a table, a CSV and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from geomoe.analysis.bench import accuracy_by_upload  # noqa: E402
from geomoe.analysis.links import LinkProfile  # noqa: E402


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
