"""The cross-layer patch-routing graph of a location (Mensah et al. 2025, Figure 5).

Nodes are the experts of consecutive MoE layers; an edge's weight is the share of the location's patches routed
through that pair of experts (per image, the outer product of the two layers' patch shares, normalised per
layer pair: the shares of a pair sum to 1, as the keep set reads them). Edges are banded by percentile of
their pair's weights, the thresholds the keep set uses: below the 90th, 90th to 99.9th, above the 99.9th.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from geomoe.model.importance import RoutingStats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BANDS = ((99.9, "above 99.9th", "#c0392b"), (90.0, "90th to 99.9th", "#e67e22"), (0.0, "below 90th", "#95a5a6"))


def band(weight: float, p90: float, p999: float) -> str:
    if weight > 0 and weight >= p999:
        return BANDS[0][1]
    if weight > 0 and weight >= p90:
        return BANDS[1][1]
    return BANDS[2][1]


def routing_graph(stats: RoutingStats, cell: str) -> dict:
    """The graph as JSON: per layer pair, its percentile thresholds and every edge with a share > 0."""
    pairs = []
    for a, b in zip(stats.layers[:-1], stats.layers[1:], strict=True):
        weights = stats.edges[a]
        p90, p999 = float(np.percentile(weights, 90)), float(np.percentile(weights, 99.9))
        edges = [
            {"from": int(i), "to": int(j), "share": float(weights[i, j]), "band": band(weights[i, j], p90, p999)}
            for i, j in zip(*np.nonzero(weights), strict=True)
        ]
        pairs.append({"from_layer": a, "to_layer": b, "p90": p90, "p99_9": p999, "edges": edges})
    patches = {str(layer): stats.expert_counts[layer].tolist() for layer in stats.layers}
    return {"cell": cell, "layers": stats.layers, "pairs": pairs, "expert_patches": patches}


def plot_routing_graph(graph: dict, path: Path) -> None:
    """Experts as columns of dots (one column per MoE layer), edges drawn with width by share, coloured by band."""
    layers = graph["layers"]
    experts = max(len(v) for v in graph["expert_patches"].values())
    figure, axes = plt.subplots(figsize=(2.2 * len(layers) + 1, max(4, experts * 0.22)))
    column = {layer: k for k, layer in enumerate(layers)}
    largest = max((e["share"] for pair in graph["pairs"] for e in pair["edges"]), default=1.0)
    for pair in graph["pairs"]:
        for edge in sorted(pair["edges"], key=lambda e: e["share"]):
            colour = next(c for _, name, c in BANDS if name == edge["band"])
            axes.plot(
                [column[pair["from_layer"]], column[pair["to_layer"]]],
                [edge["from"], edge["to"]],
                color=colour,
                linewidth=0.3 + 4 * edge["share"] / largest,
                alpha=0.35 if colour == BANDS[2][2] else 0.9,
            )
    for layer in layers:
        patches = np.array(graph["expert_patches"][str(layer)])
        sizes = 10 + 150 * patches / max(patches.max(), 1)
        axes.scatter([column[layer]] * len(patches), range(len(patches)), s=sizes, color="#2c3e50", zorder=3)
    for _, name, colour in BANDS:
        axes.plot([], [], color=colour, linewidth=2, label=name)
    axes.set_xticks(range(len(layers)), [f"MoE layer {layer}" for layer in layers])
    axes.set_ylabel("expert")
    axes.invert_yaxis()
    axes.set_title(f"patch routing of {graph['cell']} (edge width: share of patches)")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=3, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
