"""Hsu et al. 2020 adaptive S2 partition: split a cell while its top species exceeds N_max.

Starting from the six faces, a cell is subdivided while the most frequent species in it has more
than `n_max` examples, so cells end with their top species between 0.1 N_max and N_max where the
data allows. Deterministic: it depends only on the coordinates and labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import s2sphere

from geomoe.data.cells import leaf_ids, parent_ids, parse_cell, path_from_cell
from geomoe.data.datasets import GeoData, load_dataset
from geomoe.data.hsu import write_split
from geomoe.world.config import WorldConfig


@dataclass
class CellSummary:
    """One row of a partition table."""

    cell: str  # face/child-path token
    level: int | None  # S2 level; None for a client id that is no S2 cell (a camera cluster)
    examples: int  # examples in the cell
    species: int  # distinct species in the cell
    top_share: float  # share of the most frequent species
    top_count: int  # examples of the most frequent species


def adaptive_partition(
    lat: np.ndarray, lon: np.ndarray, labels: np.ndarray, n_max: int, max_level: int = 20
) -> np.ndarray:
    """Cell token of every example."""
    if n_max < 1:
        raise ValueError(f"n_max must be positive, got {n_max}")
    leaves = leaf_ids(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))
    labels = np.asarray(labels)
    cell_ids = parent_ids(leaves, 0)
    open_rows = np.arange(labels.size)
    for level in range(max_level):
        if open_rows.size == 0:
            break
        cells, inverse = np.unique(cell_ids[open_rows], return_inverse=True)
        _, species_inverse = np.unique(labels[open_rows], return_inverse=True)
        counts = np.zeros((cells.size, species_inverse.max() + 1), dtype=np.int64)
        np.add.at(counts, (inverse, species_inverse), 1)
        split = counts.max(axis=1) > n_max
        open_rows = open_rows[split[inverse]]
        cell_ids[open_rows] = parent_ids(leaves[open_rows], level + 1)
    tokens = {int(c): path_from_cell(s2sphere.CellId(int(c))) for c in np.unique(cell_ids)}
    return np.array([tokens[int(c)] for c in cell_ids])


def _level(cell: str) -> int | None:
    try:
        return parse_cell(cell).level()
    except ValueError:
        return None


def summarise(cells: np.ndarray, labels: np.ndarray) -> list[CellSummary]:
    """Per-cell table rows, largest cell first."""
    rows = []
    for cell in np.unique(cells):
        in_cell = labels[cells == cell]
        counts = np.bincount(in_cell)
        rows.append(
            CellSummary(
                cell=str(cell),
                level=_level(str(cell)),
                examples=int(in_cell.size),
                species=int((counts > 0).sum()),
                top_share=float(counts.max() / in_cell.size),
                top_count=int(counts.max()),
            )
        )
    return sorted(rows, key=lambda r: (-r.examples, r.cell))


def cells_of(data: GeoData, n_max: int) -> np.ndarray:
    """Client cell of every row: as the dataset gives them (Hsu `user_id`, camera clusters), else adaptive."""
    if data.cells is not None:
        return np.array([str(c) for c in data.cells], dtype=object)
    return adaptive_partition(data.lat, data.lon, data.labels, n_max).astype(object)


def write_partition(world: WorldConfig, out: Path) -> tuple[GeoData, np.ndarray, list[CellSummary]]:
    """Load the world's dataset, partition it into client cells and write the Hsu et al. split CSV `out`;
    the data, each row's cell and one summary row per cell (largest first)."""
    data = load_dataset(world.dataset, world.synthetic, world.files)
    cells = cells_of(data, world.n_max)
    write_split(out, cells, data.image_ids, data.labels, [data.class_names[y] for y in data.labels])
    return data, cells, summarise(cells, data.labels)
