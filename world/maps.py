"""World maps of S2 partitions (lat/lon), for people who would rather look than read.

Cells are drawn as a raster (each 1-degree pixel coloured by the cell that contains it), which
stays right at the poles and across the antimeridian where S2 outlines do not.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from geomoe.data.cells import centre, leaf_ids, parent_ids, parse_cell, path_from_cell  # noqa: E402
from geomoe.world.partition import CellSummary  # noqa: E402


def cell_raster(rows: list[CellSummary], step_deg: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Longitudes, latitudes and, per pixel, log10 examples of its cell (NaN outside every cell)."""
    lons = np.arange(-180 + step_deg / 2, 180, step_deg)
    lats = np.arange(-90 + step_deg / 2, 90, step_deg)
    grid_lon, grid_lat = np.meshgrid(lons, lats)
    leaves = leaf_ids(grid_lat.ravel(), grid_lon.ravel())
    value = np.full(leaves.size, np.nan)
    by_level: dict[int, dict[int, float]] = {}
    for row in rows:
        if row.level is not None:  # camera clusters have no cell to draw (their points are on the map)
            by_level.setdefault(row.level, {})[parse_cell(row.cell).id()] = np.log10(row.examples)
    for level, cells in by_level.items():
        parents = parent_ids(leaves, level)
        for cell_id, size in cells.items():
            value[parents == np.uint64(cell_id)] = size
    return lons, lats, value.reshape(grid_lat.shape)


def plot_cells(rows: list[CellSummary], lat: np.ndarray, lon: np.ndarray, path: Path) -> None:
    """Cells coloured by example count, with the observation points over them."""
    lons, lats, raster = cell_raster(rows)
    fig, ax = plt.subplots(figsize=(11, 5.5))
    mesh = ax.pcolormesh(lons, lats, raster, cmap="viridis", shading="nearest", alpha=0.75)
    if not np.isnan(raster).all():  # client ids that are no S2 cells (camera clusters) have no outline
        ax.contour(
            lons,
            lats,
            np.nan_to_num(raster, nan=-1),
            levels=np.unique(raster[~np.isnan(raster)]),
            colors="black",
            linewidths=0.3,
        )
    ax.scatter(lon, lat, s=1, c="white", alpha=0.5, label="observations")
    for row in [r for r in rows if r.level is not None][:15]:
        cell_lat, cell_lon = centre(path_from_cell(parse_cell(row.cell)))
        ax.annotate(
            row.cell,
            (cell_lon, cell_lat),
            fontsize=7,
            ha="center",
            color="black",
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "alpha": 0.6, "lw": 0},
        )
    fig.colorbar(mesh, ax=ax, label="log10 examples per cell")
    ax.set(
        xlim=(-180, 180),
        ylim=(-90, 90),
        xlabel="longitude",
        ylabel="latitude",
        title=f"Adaptive S2 partition: {len(rows)} cells (blank: no data)",
    )
    ax.legend(loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
