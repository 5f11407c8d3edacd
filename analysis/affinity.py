"""Affinity of species and experts to locations (Mensah et al. 2025, Figure 8).

The location loss aligns pooled pre-MLP image features with a per-block projection of the frozen Space2Vec
encoding of where the image was taken. Those projections stay on the nodes, so the analysis fits the last MoE
layer's projection again on the run's own training images (the global model frozen, the same supervised
contrastive loss). Then, as in the paper: each cell's average projected location embedding; the cosine of every
patch embedding of the cells' test images with each cell's, a softmax over cells at temperature 0.001, averaged
over the patches of each class (class x cell); and the same for the last layer's expert centroids, compared in
the router's scaled space (expert x cell). Every row is a distribution over cells: it sums to 1.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

from geomoe.model.experts import global_centroids
from geomoe.model.location import LocationSupervision, supervised_contrastive
from geomoe.prune.finished_run import BATCH, FinishedRun

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TEMPERATURE = 0.001


def fit_projection(run: FinishedRun, layer: int, epochs: int, seed: int = 0) -> LocationSupervision:
    """Location projections fitted on the run's cells' training images for `layer` (the model is frozen)."""
    model = run.model.eval()
    torch.manual_seed(seed)
    supervision = LocationSupervision(sorted(set(model.widths)), model.blocks)
    block = model.blocks[layer]
    params = [*supervision.projections[block].parameters(), *supervision.norm.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    train = np.concatenate([location.train for location in run.world.locations])
    supervision.train()
    for epoch in range(epochs):
        for images, labels, lonlat in run.world.loader(train, 64, shuffle=True, seed=seed + epoch, with_location=True):
            with torch.no_grad():
                _, pre_mlp = model.forward_with_pre_mlp(images)
            pooled = pre_mlp[layer].mean(dim=(2, 3))  # [B, C, P, N] --> [B, C]
            projected = supervision.projections[block](supervision.norm(supervision.encoder(lonlat)))
            loss = supervised_contrastive(pooled, projected, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return supervision.eval()


@torch.no_grad()
def cell_embeddings(run: FinishedRun, supervision: LocationSupervision, layer: int) -> torch.Tensor:
    """(cells, C): each cell's average projected location embedding over its training images."""
    projection = supervision.projections[run.model.blocks[layer]]
    rows = []
    for location in run.world.locations:
        batches = run.world.loader(location.train, BATCH, with_location=True)
        embedded = [projection(supervision.norm(supervision.encoder(lonlat))) for _, _, lonlat in batches]
        rows.append(torch.cat(embedded).mean(dim=0))
    return torch.stack(rows)


def assignment(vectors: torch.Tensor, cells: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax over cells of the cosine between each vector and each cell embedding: (V, cells)."""
    cosine = F.normalize(vectors, dim=-1) @ F.normalize(cells, dim=-1).T
    return torch.softmax(cosine / temperature, dim=-1)


@torch.no_grad()
def affinity(run: FinishedRun, epochs: int = 2, temperature: float = TEMPERATURE) -> dict:
    """Class x cell and expert x cell affinities at the last MoE layer."""
    layer = max(run.model.cfg.moe_layers)
    with torch.enable_grad():
        supervision = fit_projection(run, layer, epochs)
    cells = cell_embeddings(run, supervision, layer)  # (L, C)
    num_classes = run.cfg.model.num_classes
    sums = torch.zeros(num_classes, len(cells), dtype=torch.float64)
    patches = torch.zeros(num_classes, dtype=torch.float64)
    test = np.concatenate([location.test for location in run.world.locations])
    for images, labels in run.world.loader(test, BATCH):
        _, pre_mlp = run.model.forward_with_pre_mlp(images)
        tokens = pre_mlp[layer].mean(dim=2).transpose(1, 2)  # [B, C, P, N] --> [B, N, C]: a patch's embedding
        share = assignment(tokens.reshape(-1, tokens.shape[-1]), cells, temperature).double()  # (B*N, L)
        per_patch_label = labels.repeat_interleave(tokens.shape[1])
        sums.index_add_(0, per_patch_label, share)
        patches.index_add_(0, per_patch_label, torch.ones_like(per_patch_label, dtype=torch.float64))
    present = torch.nonzero(patches > 0).flatten()
    class_cell = sums[present] / patches[present, None]
    module = run.model.moe_layers()[layer]
    expert_cell = assignment(global_centroids(module), module.scale(cells), temperature)
    names = run.world.data.class_names
    return {
        "layer": layer,
        "temperature": temperature,
        "cells": [location.cell for location in run.world.locations],
        "classes": [names[int(k)] for k in present],
        "class_cell": class_cell.tolist(),
        "expert_cell": expert_cell.double().tolist(),
    }


def plot_affinity(result: dict, path: Path) -> None:
    """Two heat maps: classes x cells (top) and experts x cells (bottom), cells on the y axis as in the paper."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, len(result["classes"]) * 0.25), 6))
    for axes, key, xlabel in ((top, "class_cell", "species"), (bottom, "expert_cell", "expert")):
        matrix = np.array(result[key]).T  # cells x items
        image = axes.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        axes.set_yticks(range(len(result["cells"])), result["cells"])
        axes.set_xlabel(xlabel)
        if key == "class_cell" and len(result["classes"]) <= 60:  # names stay readable up to about this many
            axes.set_xticks(range(len(result["classes"])), result["classes"], rotation=90, fontsize=7)
        figure.colorbar(image, ax=axes)
    top.set_title(f"affinity to cells (MoE layer {result['layer']}, softmax temperature {result['temperature']:g})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
