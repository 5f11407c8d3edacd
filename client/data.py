"""A node's own data behind one interface, whatever its source; knows nothing of Flower.

Two sources: a simulated cell (row `partition-id` of the world file the server wrote, checked by
hash) and a device folder of the device's own labelled images (node config `data=/data/labelled`).
Training, evaluation and the query see only `LocalData`: splits, species present, location, and what
was left out (species the run does not know, unreadable images), which the node reports to the server.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geomoe.data.datasets import Batches, GeoData
from geomoe.data.device_folder import read_device_images, split_of
from geomoe.data.images import ImageConfig
from geomoe.data.world_file import WorldContents, read_world_file

SPLITS = ("train", "val", "test")


@dataclass
class LocalData:
    """Train / val / test rows of `data` that belong to this node, and its location."""

    data: GeoData
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    lat: float | None  # the node's location (cell centre, or the device's coordinates)
    lon: float | None
    images: ImageConfig
    source: str  # a person-readable origin: "cell 3/30" or "folder /data/labelled (camtrap-dp)"
    unknown_species: Counter[str] = field(default_factory=Counter)  # images of species the run lacks, by name
    skipped: Counter[str] = field(default_factory=Counter)  # entries left out while reading, by reason
    _opened: list[Batches] = field(default_factory=list)  # loaders handed out, for their skip counts

    def rows(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        return getattr(self, split)

    def fingerprint(self) -> str:
        """What this node's training split holds (its images and labels): changes when labelled images come in."""
        digest = hashlib.sha256(self.train.tobytes() + self.data.labels[self.train].tobytes())
        return digest.hexdigest()[:16]

    def species(self) -> list[int]:
        """Run species ids present in the training split."""
        return sorted(int(s) for s in np.unique(self.data.labels[self.train]))

    def loader(
        self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, with_location: bool = False
    ) -> Batches:
        """Batches of a split: (images, labels[, lon/lat]); shuffled train batches are augmented."""
        train = split == "train" and shuffle
        loader = self.data.loader(self.rows(split), self.images, batch_size, shuffle, seed, with_location, train)
        self._opened.append(loader)
        return loader

    def skipped_images(self) -> int:
        """Images that could not be read so far (each counted each time it was tried)."""
        return sum(loader.skipped() for loader in self._opened)


_WORLDS: dict[tuple[str, str], WorldContents] = {}  # one world file per process: loading it is the costly part


def world_contents(path: Path, sha256: str) -> WorldContents:
    key = (str(path), sha256)
    if key not in _WORLDS:
        _WORLDS.clear()
        _WORLDS[key] = read_world_file(path, sha256)
    return _WORLDS[key]


def cell_data(world_file: Path, sha256: str, index: int, images: ImageConfig) -> LocalData:
    """Client `index` of the run's world: a simulated S2 cell."""
    world = world_contents(world_file, sha256)
    if not 0 <= index < len(world.locations):
        raise ValueError(f"partition-id {index} has no client (the run has {len(world.locations)})")
    location = world.locations[index]
    return LocalData(
        world.data,
        location.train,
        location.val,
        location.test,
        location.lat,
        location.lon,
        images,
        f"cell {location.cell}",
    )


def device_data(
    path: Path,
    species_names: list[str],
    fractions: tuple[float, float, float],
    images: ImageConfig,
    lat: float | None = None,
    lon: float | None = None,
) -> LocalData:
    """The device's labelled images at `path`, split train/val/test by file name; `lat`/`lon` from node config."""
    found = read_device_images(path, species_names)
    lat = lat if lat is not None else found.lat
    lon = lon if lon is not None else found.lon
    n = len(found)
    data = GeoData(
        "device",
        found.labels,
        np.full(n, np.nan if lat is None else lat),
        np.full(n, np.nan if lon is None else lon),
        species_names,
        found.files,
        str(found.root),
    )
    split = np.array([split_of(f, fractions) for f in found.files])
    train, val, test = (np.flatnonzero(split == s) for s in range(3))
    if train.size == 0:
        raise ValueError(f"{path}: none of its {n} images falls in the training split; add images")
    seen = np.isin(found.labels[test], found.labels[train])
    return LocalData(
        data,
        train,
        val,
        test[seen],
        lat,
        lon,
        images,
        f"folder {path} ({found.layout})",
        unknown_species=found.unknown_species,
        skipped=found.skipped,
    )
