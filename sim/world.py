"""The federated world of a run: a dataset, its S2 partition, the evaluation locations and splits.

Server and clients rebuild the same world from the same `WorldConfig` (deterministic and fast),
so only the config travels. A share of the data stays with the server to pretrain the dense model
and to initialise the experts, as the papers do before deployment; the rest belongs to cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from geomoe.sim.cells import centre
from geomoe.sim.partition import adaptive_partition
from geomoe.sim.synthetic import SyntheticConfig, SyntheticGeoSpecies


@dataclass
class WorldConfig:
    """Which data, how it is split into cells and which cells become clients."""

    dataset: str = "synthetic"  # dataset registry name
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # used when dataset == "synthetic"
    n_max: int = 500  # Hsu et al. N_max: split a cell while its top species has more examples
    num_locations: int = 6  # cells that become clients (L1..L6)
    min_separation_deg: float = 20.0  # minimum great-circle distance between chosen cell centres
    min_examples: int = 60  # a location needs at least this many examples
    server_fraction: float = 0.3  # share of all examples kept by the server for pretraining
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train / val / test per location
    seed: int = 0  # splits


@dataclass
class Location:
    """One client's cell and its splits (indices into the dataset)."""

    cell: str
    lat: float
    lon: float
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def build_dataset(cfg: WorldConfig) -> SyntheticGeoSpecies:
    if cfg.dataset != "synthetic":
        raise ValueError(f"dataset {cfg.dataset!r} cannot be simulated yet: only 'synthetic' is registered")
    return SyntheticGeoSpecies(cfg.synthetic)


def _great_circle_deg(a: tuple[float, float], b: tuple[float, float]) -> float:
    la1, lo1, la2, lo2 = map(np.radians, (*a, *b))
    cos = np.sin(la1) * np.sin(la2) + np.cos(la1) * np.cos(la2) * np.cos(lo1 - lo2)
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


class WithLocation(Dataset):
    """Adds each observation's (lon, lat) to its (image, label), for the location contrastive loss."""

    def __init__(self, dataset: SyntheticGeoSpecies) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        image, label = self.dataset[index]
        return image, label, torch.tensor([self.dataset.lon[index], self.dataset.lat[index]])


class World:
    """Dataset + partition + locations, rebuilt identically wherever the config is known."""

    def __init__(self, cfg: WorldConfig) -> None:
        self.cfg = cfg
        self.dataset = build_dataset(cfg)
        self.num_classes = int(self.dataset.cfg.num_species)
        labels = self.dataset.labels
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(labels.size)
        cut = int(cfg.server_fraction * labels.size)
        self.server_indices = np.sort(order[:cut])
        client_pool = np.sort(order[cut:])
        self.cells = adaptive_partition(self.dataset.lat, self.dataset.lon, labels, cfg.n_max)
        self.locations = self._pick_locations(client_pool, rng)

    def _pick_locations(self, pool: np.ndarray, rng: np.random.Generator) -> list[Location]:
        cells, counts = np.unique(self.cells[pool], return_counts=True)
        chosen: list[Location] = []
        for index in np.lexsort((cells, -counts)):
            if counts[index] < self.cfg.min_examples or len(chosen) == self.cfg.num_locations:
                break
            cell_centre = centre(str(cells[index]))
            if any(_great_circle_deg(cell_centre, (c.lat, c.lon)) < self.cfg.min_separation_deg for c in chosen):
                continue
            members = rng.permutation(pool[self.cells[pool] == cells[index]])
            n_train = int(self.cfg.split[0] * members.size)
            n_val = int(self.cfg.split[1] * members.size)
            train, val, test = members[:n_train], members[n_train : n_train + n_val], members[n_train + n_val :]
            seen = np.isin(self.dataset.labels[test], self.dataset.labels[train])  # test keeps seen species only
            chosen.append(Location(str(cells[index]), *cell_centre, np.sort(train), np.sort(val), np.sort(test[seen])))
        if len(chosen) < self.cfg.num_locations:
            raise ValueError(
                f"only {len(chosen)} cells have >= {self.cfg.min_examples} examples and lie "
                f"{self.cfg.min_separation_deg} deg apart; asked for num_locations={self.cfg.num_locations}"
            )
        return chosen

    def species(self, indices: np.ndarray) -> list[int]:
        return sorted(int(s) for s in np.unique(self.dataset.labels[indices]))

    def loader(
        self, indices: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0, with_location: bool = False
    ) -> DataLoader:
        """Batches of (images, labels) or, `with_location`, (images, labels, lon/lat in degrees)."""
        generator = torch.Generator().manual_seed(seed)
        dataset = WithLocation(self.dataset) if with_location else self.dataset
        return DataLoader(
            Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=shuffle, generator=generator
        )

    def tensors(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([torch.from_numpy(self.dataset.image(int(i))) for i in indices])
        return images, torch.from_numpy(self.dataset.labels[indices].astype(np.int64))
