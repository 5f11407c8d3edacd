"""The federated world of a run: a dataset, its S2 partition, the clients and their splits.

The server builds the world once from its `WorldConfig` and writes it to a world file
(`geomoe.data.world_file`), cached by config; simulated clients load that file instead of
re-reading annotations. A share of the data stays with the server to pretrain the dense model and
to initialise the experts, as the papers do before deployment; the rest belongs to cells.

Clients are either the papers' evaluation locations L1..Ln (large, well-separated cells) or, with
`clients = "cells"`, every cell of the partition with enough data (Hsu et al.'s FedAvg setting).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from geomoe.data.cells import leaf_ids, parent_ids, parse_cell
from geomoe.data.datasets import Batches, GeoData, load_dataset
from geomoe.data.world_file import Location, WorldContents, read_world_file, sha256_of, write_world_file
from geomoe.world.config import WorldConfig
from geomoe.world.partition import cells_of


def _great_circle_deg(a: tuple[float, float], b: tuple[float, float]) -> float:
    la1, lo1, la2, lo2 = map(np.radians, (*a, *b))
    cos = np.sin(la1) * np.sin(la2) + np.cos(la1) * np.cos(la2) * np.cos(lo1 - lo2)
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


def cell_centre(cell: str, lat: np.ndarray, lon: np.ndarray) -> tuple[float, float]:
    """Centre of an S2 token; for other client ids (camera clusters), the mean of its rows' coordinates."""
    try:
        lat_lng = parse_cell(cell).to_lat_lng()
    except ValueError:
        return float(np.mean(lat)), float(np.mean(lon))
    return lat_lng.lat().degrees, lat_lng.lng().degrees


def in_cell(cell: str, leaves: np.ndarray) -> np.ndarray:
    """Which points (S2 leaf ids) lie in a cell; all False for a client id that is not a cell token."""
    try:
        region = parse_cell(cell)
    except ValueError:
        return np.zeros(len(leaves), dtype=bool)
    return parent_ids(leaves, region.level()) == np.uint64(region.id())


class World:
    """Data + partition + clients. `World(cfg)` builds it; `World.cached(cfg, folder)` builds it once."""

    def __init__(self, cfg: WorldConfig, contents: WorldContents | None = None) -> None:
        self.cfg = cfg
        self.contents = contents or self._build()
        self.data: GeoData = self.contents.data
        self.cells = self.contents.cells
        self.server_indices = self.contents.server_rows
        self.locations = self.contents.locations
        self.num_classes = self.data.num_classes

    @classmethod
    def cached(cls, cfg: WorldConfig, folder: Path) -> tuple[World, Path, str]:
        """The world of `cfg` from its world file in `folder` (written first if missing), the file and its hash."""
        path = folder / f"world-{cfg.key()}.npz"
        if path.is_file():
            return cls(cfg, read_world_file(path)), path, sha256_of(path)
        world = cls(cfg)
        return world, path, write_world_file(path, world.contents)

    def _build(self) -> WorldContents:
        cfg = self.cfg
        data = load_dataset(cfg.dataset, cfg.synthetic, cfg.files)
        if len(data.labels) == 0:
            raise ValueError(f"world.dataset={cfg.dataset!r}: no observation with a location ({data.skipped})")
        own_test = np.zeros(len(data.labels), dtype=bool)
        if data.test_rows is not None:
            own_test[data.test_rows] = True
        cells = cells_of(data, cfg.n_max)
        cells[own_test] = ""
        rng = np.random.default_rng(cfg.seed)
        candidates = np.flatnonzero(~own_test)
        order = rng.permutation(candidates)
        cut = int(cfg.server_fraction * order.size)
        server_rows = np.sort(order[:cut])
        pool = np.sort(order[cut:])
        locations = self._pick_locations(data, cells, pool, np.flatnonzero(own_test), rng)
        return WorldContents(data, cells, server_rows, locations)

    def _pick_locations(
        self, data: GeoData, cells: np.ndarray, pool: np.ndarray, own_test: np.ndarray, rng: np.random.Generator
    ) -> list[Location]:
        cfg = self.cfg
        # Rows of each cell, in pool order, by one sort (a comparison per cell is quadratic at iNat scale).
        names, inverse, counts = np.unique(cells[pool].astype(str), return_inverse=True, return_counts=True)
        rows_of = np.split(pool[np.argsort(inverse, kind="stable")], np.cumsum(counts)[:-1])
        test_leaves = leaf_ids(data.lat[own_test], data.lon[own_test]) if own_test.size else None
        every_cell = cfg.clients == "cells"
        chosen: list[Location] = []
        for index in np.lexsort((names, -counts)):
            if counts[index] < cfg.min_examples or (not every_cell and len(chosen) == cfg.num_locations):
                break
            cell = str(names[index])
            members = rows_of[index]
            lat, lon = cell_centre(cell, data.lat[members], data.lon[members])
            if not every_cell and any(
                _great_circle_deg((lat, lon), (c.lat, c.lon)) < cfg.min_separation_deg for c in chosen
            ):
                continue
            members = rng.permutation(members)
            n_train = int(cfg.split[0] * members.size)
            n_val = int(cfg.split[1] * members.size)
            train, val = members[:n_train], members[n_train : n_train + n_val]
            test = members[n_train + n_val :]
            if own_test.size:  # the dataset's own test set: its rows inside this cell
                test = own_test[in_cell(cell, test_leaves)]
            test = test[np.isin(data.labels[test], data.labels[train])]  # test keeps species seen in training
            chosen.append(Location(cell, lat, lon, np.sort(train), np.sort(val), np.sort(test)))
        if not chosen or (not every_cell and len(chosen) < cfg.num_locations):
            raise ValueError(
                f"only {len(chosen)} cells have >= {cfg.min_examples} examples"
                + ("" if every_cell else f" and lie {cfg.min_separation_deg} deg apart")
                + f"; asked for {'at least one' if every_cell else f'num_locations={cfg.num_locations}'}"
            )
        return chosen

    def species(self, indices: np.ndarray) -> list[int]:
        return sorted(int(s) for s in np.unique(self.data.labels[indices]))

    def loader(
        self,
        indices: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        with_location: bool = False,
        train: bool = False,
    ) -> Batches:
        """Batches of (images, labels) or, `with_location`, (images, labels, lon/lat in degrees)."""
        return self.data.loader(indices, self.cfg.images, batch_size, shuffle, seed, with_location, train)

    def tensors(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of `indices` as two tensors (unreadable images left out)."""
        dataset = self.data.images(indices, self.cfg.images)
        items = [item for item in (dataset[i] for i in range(len(dataset))) if item is not None]
        return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])
