"""Per-row federated averaging: the math of per-expert aggregation, free of Flower and models.

An expert (or a classifier row) is one row of a stacked tensor. Its new value is its old value
plus the weighted mean of the deltas of the clients that hold it, with weights normalised per
row over just those clients. A row nobody sent keeps its value. Dense FedAvg is the special case
where every client sends every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowUpdate:
    """One client's update to some rows of a stacked tensor."""

    ids: torch.Tensor  # (k,) global row ids
    delta: torch.Tensor  # (k, ...) change of those rows
    weight: torch.Tensor  # (k,) weight of this client for each row (tokens or examples)


def mean_row_delta(num_rows: int, updates: list[RowUpdate]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-row weighted mean delta (zeros where untouched) and the mask of rows with weight > 0."""
    if not updates:
        return None, torch.zeros(num_rows, dtype=torch.bool)
    row_shape = updates[0].delta.shape[1:]
    total = torch.zeros((num_rows, *row_shape), dtype=torch.float64)
    weight = torch.zeros(num_rows, dtype=torch.float64)
    for update in updates:
        w = update.weight.double()
        total.index_add_(0, update.ids, update.delta.double() * w.reshape(-1, *([1] * len(row_shape))))
        weight.index_add_(0, update.ids, w)
    touched = weight > 0
    mean = torch.zeros_like(total)
    mean[touched] = total[touched] / weight[touched].reshape(-1, *([1] * len(row_shape)))
    return mean.float(), touched


def mean_delta(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Plain FedAvg: example-weighted mean of whole-tensor deltas."""
    total = sum(weights)
    if total <= 0:
        raise ValueError("FedAvg needs a positive total weight")
    return sum(d.double() * (w / total) for d, w in zip(deltas, weights, strict=True)).to(deltas[0].dtype)
