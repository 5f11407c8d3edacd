"""Registered datasets: each turns its published files into `GeoData` (observations + how to load images).

`synthetic` is the embedded default (images generated, nothing on disk). The others read the published
formats: `inat2017` (train2017.json + train2017_locations.json + image root), `inat2021` (coordinates
on the images), `iwildcam` (WILDS metadata.csv + the camera GPS file; camera clusters become cells) and
`hsu` (Hsu et al.'s iNaturalist-Geo split CSVs as published: `user_id` is the client, `test.csv` the
test set; file names and coordinates from the iNat 2017 JSON) and `folder` (a labelled folder of one's own,
e.g. the server's data in a deployment: a manifest with `lat,lon` or a Camtrap DP package).

Longer than 300 lines because the registry is the list of readers of the published formats, one short function
each, read side by side (their parsers of the files themselves live in inat.py, hsu.py, wilds.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from geomoe.data.device_folder import read_device_images
from geomoe.data.hsu import read_split
from geomoe.data.images import ImageConfig, ImageFiles, collate
from geomoe.data.inat import load_inat
from geomoe.data.records import GeoRecords
from geomoe.data.synthetic import SyntheticConfig, SyntheticGeoSpecies
from geomoe.data.wilds import load_wilds


@dataclass
class DataFiles:
    """Where a file-backed dataset lives (ignored by `synthetic`)."""

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys are refused when pydantic builds it from a file

    root: str = ""  # image root: file names in the annotations are relative to it
    annotations: list[str] = field(default_factory=list)  # iNat JSON(s): train2017.json [, val2017.json]
    locations: list[str] = field(default_factory=list)  # iNat 2017 locations JSON(s), one per annotation file
    train_split: str = ""  # hsu: federated_train*.csv (user_id, image_id, class, label)
    test_split: str = ""  # hsu: test.csv (image_id, class, label)
    metadata: str = ""  # iwildcam: WILDS metadata.csv
    gps: str = ""  # iwildcam: camera coordinates JSON (gps_locations.json)
    cluster_km: float = 50.0  # iwildcam: cameras closer than this (chained) form one client
    folder: str = ""  # folder: labelled images with coordinates (manifest.csv with lat,lon, or Camtrap DP)

    def fingerprint(self) -> list[tuple[str, int, int]]:
        """(path, size, mtime) of every named input file, so that a world built from older files is not reused."""
        named = [*self.annotations, *self.locations, self.train_split, self.test_split, self.metadata, self.gps]
        if self.folder:
            named += [str(Path(self.folder) / f) for f in ("manifest.csv", "observations.csv", "media.csv")]
        stats = [(p, Path(p).stat()) for p in named if p and Path(p).is_file()]
        return [(p, st.st_size, st.st_mtime_ns) for p, st in stats]


@dataclass
class GeoData:
    """Observations (one row each) of a dataset and the way to their images.

    `cells` is set when the dataset comes partitioned (Hsu et al. `user_id`, iWildCam camera clusters);
    `test_rows` when it names its own test set (rows that belong to no client).
    """

    name: str
    labels: np.ndarray  # class index 0..C-1 per row
    lat: np.ndarray  # degrees per row
    lon: np.ndarray  # degrees per row
    class_names: list[str]  # name of each class index
    files: list[str] = field(default_factory=list)  # image path per row, relative to `root`
    root: str = ""  # image root
    image_ids: list[str] = field(default_factory=list)  # the dataset's id of each row (Hsu split CSVs name them)
    cells: np.ndarray | None = None  # given client id per row (str), or None: partition by S2 cells
    test_rows: np.ndarray | None = None  # rows of the dataset's own test set
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out while loading
    synthetic: SyntheticConfig | None = None  # set for the synthetic world (images generated)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def images(self, rows: np.ndarray, cfg: ImageConfig, train: bool = False, seed: int = 0) -> Dataset:
        """(image, label) items of `rows`, in order; an unreadable file yields None (counted, see ImageFiles)."""
        if self.synthetic is not None:
            return Subset(_synthetic(self.synthetic), rows.tolist())
        return ImageFiles(Path(self.root), [self.files[i] for i in rows], self.labels[rows], cfg, train, seed)

    def loader(
        self,
        rows: np.ndarray,
        cfg: ImageConfig,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        with_location: bool = False,
        train: bool = False,
    ) -> Batches:
        """Batches of (images, labels) or, `with_location`, (images, labels, lon/lat in degrees); `train` augments."""
        items = self.images(rows, cfg, train=train, seed=seed)
        opened = items
        if with_location:
            items = WithLocation(items, np.stack([self.lon[rows], self.lat[rows]], axis=1))
        return Batches(batches_of(items, batch_size, shuffle, seed), opened)


_SYNTHETIC: dict[str, SyntheticGeoSpecies] = {}


def _synthetic(cfg: SyntheticConfig) -> SyntheticGeoSpecies:
    """One generator per config in a process (building it is the costly part of a small world)."""
    key = repr(cfg)
    if key not in _SYNTHETIC:
        _SYNTHETIC.clear()
        _SYNTHETIC[key] = SyntheticGeoSpecies(cfg)
    return _SYNTHETIC[key]


class WithLocation(Dataset):
    """Adds each row's (lon, lat) to its (image, label), for the location contrastive loss."""

    def __init__(self, items: Dataset, lonlat: np.ndarray) -> None:
        self.items, self.lonlat = items, torch.from_numpy(np.asarray(lonlat, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.lonlat)

    def __getitem__(self, index: int) -> tuple | None:
        item = self.items[index]
        return None if item is None else (*item, self.lonlat[index])


class Batches:
    """A DataLoader without the batches in which no image could be read; `items` counts what it skipped."""

    def __init__(self, loader: DataLoader, items: Dataset) -> None:
        self.loader, self.items = loader, items

    def skipped(self) -> int:
        return sum(self.items.skipped.values()) if isinstance(self.items, ImageFiles) else 0

    def __iter__(self):
        return (batch for batch in self.loader if batch is not None)

    def __len__(self) -> int:
        return len(self.loader)


def batches_of(items: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate)


# --- the registry --------------------------------------------------------------------------------
def _need(value: str | list[str], name: str, dataset: str) -> None:
    if not value:
        raise ValueError(f"world.dataset={dataset!r} needs world.files.{name}")


def _from_records(name: str, records: GeoRecords, root: str, cells: np.ndarray | None = None) -> GeoData:
    return GeoData(
        name,
        records.labels,
        records.lat,
        records.lon,
        records.class_names,
        records.file_names,
        root,
        records.image_ids,
        cells=cells,
        skipped=dict(records.skipped),
    )


def _inat_records(files: DataFiles, dataset: str, with_locations: bool) -> GeoRecords:
    _need(files.annotations, "annotations", dataset)
    if with_locations and len(files.locations) != len(files.annotations):
        raise ValueError(
            f"world.dataset={dataset!r} needs one world.files.locations JSON per annotation file "
            f"({len(files.annotations)} annotations, {len(files.locations)} locations)"
        )
    parts = [
        load_inat(Path(a), Path(files.locations[i]) if with_locations else None)
        for i, a in enumerate(files.annotations)
    ]
    return merge_records(parts)


def merge_records(parts: list[GeoRecords]) -> GeoRecords:
    """One record set from several annotation files; classes are matched by name."""
    names = sorted({n for p in parts for n in p.class_names})
    index_of = {n: i for i, n in enumerate(names)}
    skipped: dict[str, int] = {}
    for part in parts:
        for reason, count in part.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    return GeoRecords(
        [i for p in parts for i in p.image_ids],
        [f for p in parts for f in p.file_names],
        np.concatenate([p.lat for p in parts]),
        np.concatenate([p.lon for p in parts]),
        np.concatenate([np.array([index_of[p.class_names[y]] for y in p.labels], dtype=np.int64) for p in parts]),
        names,
        skipped=skipped,
    )


def load_synthetic(world_synthetic: SyntheticConfig, files: DataFiles) -> GeoData:
    data = _synthetic(world_synthetic)
    names = [f"species_{i:02d}" for i in range(world_synthetic.num_species)]
    return GeoData(
        "synthetic",
        data.labels,
        data.lat.astype(np.float64),
        data.lon.astype(np.float64),
        names,
        image_ids=[str(i) for i in range(len(data.labels))],
        synthetic=world_synthetic,
    )


def load_inat2017(_: SyntheticConfig, files: DataFiles) -> GeoData:
    return _from_records("inat2017", _inat_records(files, "inat2017", with_locations=True), files.root)


def load_inat2021(_: SyntheticConfig, files: DataFiles) -> GeoData:
    return _from_records("inat2021", _inat_records(files, "inat2021", with_locations=False), files.root)


def load_iwildcam(_: SyntheticConfig, files: DataFiles) -> GeoData:
    _need(files.metadata, "metadata", "iwildcam")
    _need(files.gps, "gps", "iwildcam")
    records = load_wilds(Path(files.metadata), Path(files.gps), files.cluster_km)
    groups = records.groups if records.groups is not None else np.zeros(len(records), dtype=np.int64)
    return _from_records("iwildcam", records, files.root, cells=np.array([f"cluster-{g}" for g in groups]))


def load_hsu(_: SyntheticConfig, files: DataFiles) -> GeoData:
    """Hsu et al. splits as published; images and coordinates looked up by iNat image id."""
    _need(files.train_split, "train_split", "hsu")
    _need(files.test_split, "test_split", "hsu")
    records = _inat_records(files, "hsu", with_locations=True)
    row_of = {image_id: row for row, image_id in enumerate(records.image_ids)}
    train, test = read_split(Path(files.train_split)), read_split(Path(files.test_split))
    if train.user_ids is None:
        raise ValueError(f"{files.train_split}: a train split needs the user_id column")
    if test.user_ids is not None:
        raise ValueError(f"{files.test_split}: a test split has no user_id column")
    names_of_class: dict[int, str] = {}
    rows, cells, labels = [], [], []
    skipped: dict[str, int] = dict(records.skipped)
    for split, path in ((train, files.train_split), (test, files.test_split)):
        for number, (image_id, label) in enumerate(zip(split.image_ids, split.labels, strict=True), start=2):
            if image_id not in row_of:
                raise ValueError(
                    f"{path}, row {number}, field 'image_id': {image_id!r} has no annotation with a location "
                    f"in {', '.join(files.annotations)}"
                )
            rows.append(row_of[image_id])
            labels.append(int(label))
            names_of_class.setdefault(int(label), records.class_names[records.labels[row_of[image_id]]])
        cells.extend(split.user_ids or [""] * len(split.image_ids))
    classes = sorted(names_of_class)
    index_of = {c: i for i, c in enumerate(classes)}
    picked = np.array(rows, dtype=np.int64)
    n_train = len(train.image_ids)
    return GeoData(
        "hsu",
        np.array([index_of[c] for c in labels], dtype=np.int64),
        records.lat[picked],
        records.lon[picked],
        [names_of_class[c] for c in classes],
        [records.file_names[i] for i in picked],
        files.root,
        [records.image_ids[i] for i in picked],
        cells=np.array(cells, dtype=object),
        test_rows=np.arange(n_train, len(rows)),
        skipped=skipped,
    )


def load_folder(_: SyntheticConfig, files: DataFiles) -> GeoData:
    """A labelled folder of one's own; every species in it is a class, rows need coordinates to be partitioned."""
    _need(files.folder, "folder", "folder")
    found = read_device_images(Path(files.folder), None)
    placed = ~np.isnan(found.row_lat)
    if not placed.any():
        raise ValueError(
            f"world.files.folder: {files.folder} gives no coordinates; use a manifest.csv with lat,lon columns "
            "or a Camtrap DP package (species folders alone cannot be partitioned by place)"
        )
    skipped = dict(found.skipped)
    if (~placed).any():
        skipped["without coordinates"] = int((~placed).sum())
    rows = np.flatnonzero(placed)
    return GeoData(
        "folder",
        found.labels[rows],
        found.row_lat[rows],
        found.row_lon[rows],
        found.class_names,
        [found.files[i] for i in rows],
        str(found.root),
        [found.files[i] for i in rows],
        skipped=skipped,
    )


DATASETS: dict[str, Callable[[SyntheticConfig, DataFiles], GeoData]] = {
    "synthetic": load_synthetic,
    "inat2017": load_inat2017,
    "inat2021": load_inat2021,
    "iwildcam": load_iwildcam,
    "hsu": load_hsu,
    "folder": load_folder,
}


def load_dataset(name: str, synthetic: SyntheticConfig, files: DataFiles) -> GeoData:
    if name not in DATASETS:
        raise ValueError(f"world.dataset={name!r} is not one of {', '.join(DATASETS)}")
    return DATASETS[name](synthetic, files)
