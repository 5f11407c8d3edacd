"""Router supervision for per-image routing (Mobile V-MoE, Daxberger et al. 2023).

Classes a baseline confuses with each other form a super-class; each expert takes one super-class,
and an auxiliary loss teaches the per-image router to send an image to its class's expert.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from geomoe.model.compute import model_device
from geomoe.model.network import GeoMoENet


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes))
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def superclasses(confusion: np.ndarray, num_superclasses: int) -> np.ndarray:
    """Super-class of every class: average-linkage clustering on symmetrised, row-normalised confusion."""
    from sklearn.cluster import AgglomerativeClustering  # here, not above: scikit-learn takes ~1 s to load

    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    affinity = (rates + rates.T) / 2
    np.fill_diagonal(affinity, 1.0)
    distance = 1.0 - affinity / affinity.max()
    model = AgglomerativeClustering(n_clusters=num_superclasses, metric="precomputed", linkage="average")
    return model.fit_predict(distance)


@torch.no_grad()
def superclasses_of(model: GeoMoENet, batches, num_classes: int, count: int) -> np.ndarray:
    """Super-class of every class from `model`'s confusion on `batches` (a dense baseline, as in the paper);
    `count` is capped at the number of classes."""
    model.eval()
    labels, predictions = [], []
    device = model_device(model)
    for images, batch_labels, *_ in batches:
        logits = model(images.to(device))
        predictions.append(model.head.class_ids[logits.argmax(dim=1)].cpu().numpy())
        labels.append(batch_labels.numpy())
    confusion = confusion_matrix(np.concatenate(labels), np.concatenate(predictions), num_classes)
    return superclasses(confusion, min(count, num_classes))


def router_supervision_loss(model: GeoMoENet, labels: torch.Tensor, class_to_superclass: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each per-image router (after a forward pass) against the label's super-class, over the
    images whose super-class expert this model holds (a node holds only some experts); 0 if none."""
    targets = class_to_superclass[labels.cpu()]
    losses = []
    for module in model.moe_layers().values():
        if module.last_logits is None:
            raise RuntimeError("router supervision needs routing='image' and a forward pass first")
        held = module.expert_ids.tolist()
        local = torch.tensor([held.index(t) if t in held else -100 for t in targets.tolist()])
        if (local >= 0).any():
            logits = module.last_logits.float()
            losses.append(F.cross_entropy(logits, local.to(logits.device), ignore_index=-100))
    return torch.stack(losses).mean() if losses else torch.zeros((), device=labels.device)
