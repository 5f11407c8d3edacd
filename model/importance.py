"""Expert importance for a location (Mensah et al. 2025, Sec. 3.3).

Route the location's images; count patches on each edge between consecutive MoE layers (per
image, the outer product of the two layers' patch shares), normalised per layer pair. An expert
all of whose edges fall below the percentile threshold is unimportant. The costlier per-expert
importance removes one expert at a time (MLP_e(x) <- -x) and measures the accuracy drop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from geomoe.model.compute import model_device
from geomoe.model.experts import KeepSet, prune_model
from geomoe.model.network import GeoMoENet
from geomoe.model.training import evaluate


@dataclass
class KeepPolicy:
    """How a keep set is chosen from a routing graph."""

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys are refused when pydantic builds it from a file

    percentile: float = 90.0  # edge weight percentile an expert must reach on some edge
    max_per_layer: int | None = None  # None: no cap; else keep at most this many experts per layer (heaviest first)
    always_keep: dict[int, list[int]] = field(default_factory=dict)  # layer -> ids kept regardless


@dataclass
class RoutingStats:
    """Routing of a set of images: patch counts per expert and edge weights between MoE layers."""

    layers: list[int]  # MoE layers in order
    expert_counts: dict[int, np.ndarray]  # layer -> (E,) patches routed to each global expert
    edges: dict[int, np.ndarray]  # first layer of a consecutive pair -> (E, E) normalised edge weights

    def merge(self, other: RoutingStats) -> RoutingStats:
        """Sum of two stats (edges renormalised)."""
        counts = {k: self.expert_counts[k] + other.expert_counts[k] for k in self.layers}
        edges = {k: _normalise(self.edges[k] + other.edges[k]) for k in self.edges}
        return RoutingStats(self.layers, counts, edges)


def _normalise(matrix: np.ndarray) -> np.ndarray:
    total = matrix.sum()
    return matrix / total if total > 0 else matrix


def choice_histograms(model: GeoMoENet) -> dict[int, np.ndarray]:
    """Per image, the patches its last forward pass routed to each global expert: layer -> (B, E)."""
    out = {}
    for layer, module in model.moe_layers().items():
        choice = module.last_choice  # (B, N), -1 where removed
        hist = np.zeros((choice.shape[0], module.num_global_experts))
        choice = choice.cpu().numpy()
        rows, cols = np.nonzero(choice >= 0)
        np.add.at(hist, (rows, choice[rows, cols]), 1)
        out[layer] = hist
    return out


@torch.no_grad()
def routing_stats(model: GeoMoENet, batches: Iterable) -> RoutingStats:
    """Route every image of `batches` (yielding images first) and build the routing graph."""
    model.eval()
    layers = list(model.cfg.moe_layers)
    num_experts = model.cfg.num_experts
    counts = {layer: np.zeros(num_experts) for layer in layers}
    edges = {a: np.zeros((num_experts, num_experts)) for a in layers[:-1]}
    device = model_device(model)
    for batch in batches:
        model(batch[0].to(device))
        hist = choice_histograms(model)
        for layer in layers:
            counts[layer] += hist[layer].sum(axis=0)
        for a, b in zip(layers[:-1], layers[1:], strict=True):
            share_a = hist[a] / np.maximum(hist[a].sum(axis=1, keepdims=True), 1)
            share_b = hist[b] / np.maximum(hist[b].sum(axis=1, keepdims=True), 1)
            edges[a] += share_a.T @ share_b  # (E, E): co-routing of patches within each image
    return RoutingStats(layers, counts, {a: _normalise(m) for a, m in edges.items()})


def keep_set(stats: RoutingStats, policy: KeepPolicy) -> KeepSet:
    """Important experts per layer under `policy`; every layer keeps at least its busiest expert."""
    layers = stats.layers
    important = {layer: np.zeros(len(stats.expert_counts[layer]), dtype=bool) for layer in layers}
    if len(layers) == 1:
        counts = stats.expert_counts[layers[0]]
        important[layers[0]] = (counts > 0) & (counts >= np.percentile(counts, policy.percentile))
    for a, b in zip(layers[:-1], layers[1:], strict=True):
        edges = stats.edges[a]
        strong = (edges > 0) & (edges >= np.percentile(edges, policy.percentile))
        important[a] |= strong.any(axis=1)
        important[b] |= strong.any(axis=0)
    keep: KeepSet = {}
    for layer in layers:
        counts = stats.expert_counts[layer]
        ids = [int(i) for i in np.flatnonzero(important[layer])] or [int(counts.argmax())]
        if policy.max_per_layer is not None:
            ids = sorted(ids, key=lambda i: -counts[i])[: policy.max_per_layer]
        keep[layer] = sorted(set(ids) | set(policy.always_keep.get(layer, [])))
    return keep


def per_expert_importance(model: GeoMoENet, batches: list) -> dict[int, dict[int, float]]:
    """Accuracy drop when each held expert alone is removed: layer -> {expert id: drop}."""
    base = evaluate(model, batches)["accuracy"]
    drops: dict[int, dict[int, float]] = {}
    for layer, module in model.moe_layers().items():
        held = module.expert_ids.tolist()
        drops[layer] = {}
        for expert in held:
            if len(held) == 1:
                drops[layer][expert] = float("nan")
                continue
            without = prune_model(model, {layer: [i for i in held if i != expert]}, absent_policy="remove")
            drops[layer][expert] = base - evaluate(without, batches)["accuracy"]
    return drops
