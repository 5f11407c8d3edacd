"""Per-row federated averaging: the math of per-expert aggregation, free of Flower and models.

An expert (or a classifier row) is one row of a stacked tensor. Its new value is its old value
plus the weighted mean of the deltas of the clients that hold it, with weights normalised per
row over just those clients. A row nobody sent keeps its value. Dense FedAvg is the special case
where every client sends every row; a shared tensor is a stack of one row.

Two variants replace the mean: a differentially private one (noisy sums of clipped updates over fixed
denominators, `noisy_row_mean`) and robust ones (coordinate-wise median or trimmed mean over each row's holders,
`robust_row_delta`). Flower's DP wrappers and robust strategies need every reply to hold the same whole arrays;
these work per row, over whichever clients hold it.
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


def noisy_row_mean(
    shape: tuple[int, ...],
    updates: list[RowUpdate],
    expected_holders: torch.Tensor,
    noise_std: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentially private per-row mean: (sum of the holders' clipped rows + N(0, noise_std^2)) / expected
    holders, on every row some node could hold (expected > 0), whether or not one did this round.

    Weights are 1 and the denominator fixed (sampling rate x nodes holding the row, never below 1, so a rarely
    sampled holder's update is not amplified past its own size): token or example weights, and the count of
    actual holders, would depend on who took part. Noise goes on every coordinate of every such row, so one
    node's whole clipped update (norm <= C, spread over any rows) is hidden by N(0, (zC)^2).
    """
    total = torch.zeros(shape, dtype=torch.float64)
    for update in updates:
        total.index_add_(0, update.ids, update.delta.double())
    touched = expected_holders > 0
    noise = torch.randn(shape, generator=generator, dtype=torch.float64) * noise_std
    mean = torch.zeros_like(total)
    denominator = expected_holders.double().clamp(min=1.0).reshape(-1, *([1] * (len(shape) - 1)))
    mean[touched] = (total[touched] + noise[touched]) / denominator[touched]
    return mean.float(), touched


def robust_row_delta(
    num_rows: int, updates: list[RowUpdate], aggregator: str, trim_fraction: float, min_holders: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-row coordinate-wise median or trimmed mean over the holders of each row (weights are ignored).

    "median" is the middle value (mean of the two middle ones for an even count); "trimmed_mean" drops
    floor(trim_fraction x holders) values at each end of every coordinate. A row with fewer than `min_holders`
    holders has no majority that could outvote a hostile one, so it takes the mean of its holders' rows, each
    first scaled down to at most the median row norm of this tensor over all holders (a norm-bounded mean): a lone
    holder still trains its expert, but moves it no further than a typical update does.
    """
    if not updates:
        return None, torch.zeros(num_rows, dtype=torch.bool)
    row_shape = updates[0].delta.shape[1:]
    stacked = torch.full((len(updates), num_rows, *row_shape), float("nan"), dtype=torch.float64)  # (H, R, ...)
    for h, update in enumerate(updates):
        stacked[h, update.ids] = update.delta.double()
    flat = stacked.reshape(len(updates), num_rows, -1)  # (H, R, D): a row of any shape, scalars included
    present = ~flat.isnan().any(dim=2)  # (H, R): holder h sent row r
    count = present.sum(dim=0)  # (R,)
    ordered = stacked.sort(dim=0).values  # NaN (rows a holder lacks) sort last, per coordinate
    if aggregator == "median":
        trim = torch.div(count - 1, 2, rounding_mode="floor").clamp(min=0)
    elif aggregator == "trimmed_mean":
        trim = (count.double() * trim_fraction).floor().long()
    else:
        raise ValueError(f"unknown robust aggregator {aggregator!r}")
    position = torch.arange(len(updates)).reshape(-1, 1)  # (H, 1)
    kept = (position >= trim) & (position < count - trim)  # (H, R)
    kept_values = kept.reshape(*kept.shape, *([1] * len(row_shape)))
    robust = torch.where(kept_values, ordered, 0.0).sum(dim=0) / kept_values.sum(dim=0).clamp(min=1)

    norms = flat.nan_to_num(0.0).norm(dim=2)  # (H, R)
    bound = norms[present].median() if present.any() else torch.tensor(0.0, dtype=torch.float64)
    scale = torch.where(norms > bound, bound / norms.clamp(min=1e-30), torch.ones_like(norms))
    scaled = (stacked.nan_to_num(0.0) * scale.reshape(*scale.shape, *([1] * len(row_shape)))).sum(dim=0)
    bounded = scaled / count.clamp(min=1).reshape(-1, *([1] * len(row_shape)))

    few = (count < min_holders).reshape(-1, *([1] * len(row_shape)))
    delta = torch.where(few, bounded, robust)
    return delta.float(), count > 0
