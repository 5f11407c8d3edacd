"""The pruning trade-off of a location (Mensah et al. 2025, Figure 9): for a range of percentile thresholds,
how many experts its keep set drops (of experts x MoE layers) and the accuracy on its test images, under both
policies for patches whose expert was dropped (route to the best present expert, or remove: MLP_e(x) <- -x).
The head keeps every class, so the curve shows what dropping experts alone costs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

from geomoe.model.config import ABSENT_POLICIES
from geomoe.model.experts import prune_model
from geomoe.model.importance import KeepPolicy, keep_set
from geomoe.model.training import evaluate
from geomoe.prune.finished_run import BATCH, FinishedRun

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PERCENTILES = (0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9)


def pruning_sweep(run: FinishedRun, cell: str, percentiles: tuple[float, ...] = PERCENTILES) -> dict:
    """One row per percentile: experts kept and dropped, and test accuracy under each absent-expert policy."""
    location = run.location(cell)
    stats = run.routing(location)  # routed once; every threshold reads the same graph
    test = list(run.world.loader(location.test, BATCH))
    total = run.cfg.model.num_experts * len(run.cfg.model.moe_layers)
    rows = []
    for percentile in sorted(percentiles):
        keep = keep_set(stats, KeepPolicy(percentile=percentile))
        kept = sum(len(ids) for ids in keep.values())
        accuracy = {
            policy: float(evaluate(prune_model(run.model, keep, absent_policy=policy), test)["accuracy"])
            for policy in ABSENT_POLICIES
        }
        rows.append({"percentile": percentile, "experts_kept": kept, "experts_dropped": total - kept,
                     "accuracy": accuracy})  # fmt: skip
    full = float(evaluate(run.model, test)["accuracy"])
    return {"cell": cell, "experts_total": total, "test_images": len(location.test), "full_accuracy": full,
            "rows": rows}  # fmt: skip


def plot_sweep(sweep: dict, path: Path) -> None:
    """Accuracy against the percentile for each policy, experts dropped on the right axis."""
    figure, axes = plt.subplots(figsize=(7, 4))
    xs = [row["percentile"] for row in sweep["rows"]]
    for policy in ABSENT_POLICIES:
        axes.plot(xs, [row["accuracy"][policy] for row in sweep["rows"]], "o-", label=f"accuracy ({policy})")
    axes.axhline(sweep["full_accuracy"], color="grey", linestyle="--", label="global model")
    axes.set(xlabel="percentile threshold", ylabel="test accuracy", title=f"pruning {sweep['cell']}")
    dropped = axes.twinx()
    dropped.bar(xs, [row["experts_dropped"] for row in sweep["rows"]], width=1.5, alpha=0.25, color="black")
    dropped.set_ylabel(f"experts dropped (of {sweep['experts_total']})")
    axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
