"""A field device's own labelled images, in one of three layouts, mapped onto the run's species.

- a folder tree `DIR/<species name>/*.jpg` (what a person sorting camera-trap photos makes);
- a CSV manifest `file,species[,lat,lon]` (`DIR/manifest.csv`, or the CSV file itself);
- a Camtrap DP package (the camera-trap data standard): `deployments.csv` (deploymentID, latitude,
  longitude), `media.csv` (mediaID, deploymentID, filePath), `observations.csv` (mediaID,
  scientificName); observations without a mediaID (event-level) or a species are not labels.

Species are matched to the run's names exactly, then ignoring case, underscores and extra spaces.
An image of a species the run does not know is counted by name (the server shows it), never dropped
silently; a layout error names the file, row and field.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geomoe.data.records import check_coordinate

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("file", "species")
CAMTRAP_FILES = ("deployments.csv", "media.csv", "observations.csv")


@dataclass
class DeviceImages:
    """Labelled images of a device: files relative to `root`, global species ids, optional coordinates."""

    root: Path
    files: list[str]
    labels: np.ndarray  # species id per file (index into `class_names`)
    layout: str  # folders | manifest | camtrap-dp
    class_names: list[str] = field(default_factory=list)  # the run's species, or those found (no run list)
    row_lat: np.ndarray | None = None  # degrees per file; NaN where the layout gives none
    row_lon: np.ndarray | None = None
    lat: float | None = None  # mean coordinates the layout gives (manifest columns, Camtrap DP deployments)
    lon: float | None = None
    unknown_species: Counter[str] = field(default_factory=Counter)  # name -> images of species the run lacks
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> entries left out

    def __len__(self) -> int:
        return len(self.files)


def normalise(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


class SpeciesIndex:
    """Run species id of a name: exact first, then normalised (case, underscores, spaces)."""

    def __init__(self, names: list[str]) -> None:
        self.exact = {n: i for i, n in enumerate(names)}
        self.loose = {normalise(n): i for i, n in enumerate(names)}

    def get(self, name: str) -> int | None:
        return self.exact.get(name, self.loose.get(normalise(name)))


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(reader.fieldnames or [])}"
            )
        return list(reader)


class _Collector:
    """Accumulates (file, species, coordinates) entries; `done` maps species, counting unknown ones."""

    def __init__(self, root: Path, layout: str) -> None:
        self.root, self.layout = root, layout
        self.entries: list[tuple[str, str, float, float]] = []
        self.skipped: Counter[str] = Counter()

    def add(self, file: str, name: str, where: str, lat: float = np.nan, lon: float = np.nan) -> None:
        if not (self.root / file).is_file():
            raise FileNotFoundError(f"{where}, field 'file': {self.root / file} does not exist")
        self.entries.append((file, name, lat, lon))

    def done(self, species_names: list[str] | None) -> DeviceImages:
        names = species_names if species_names is not None else sorted({name for _, name, *_ in self.entries})
        index = SpeciesIndex(names)
        images = DeviceImages(self.root, [], np.zeros(0, np.int64), self.layout, names, skipped=self.skipped)
        labels, lats, lons = [], [], []
        for file, name, lat, lon in self.entries:
            label = index.get(name)
            if label is None:
                images.unknown_species[name] += 1
                continue
            images.files.append(file)
            labels.append(label)
            lats.append(lat)
            lons.append(lon)
        images.labels = np.array(labels, dtype=np.int64)
        images.row_lat, images.row_lon = np.array(lats, dtype=np.float64), np.array(lons, dtype=np.float64)
        placed = [(a, b) for _, _, a, b in self.entries if a == a]  # where the device's images were taken
        if placed:
            images.lat, images.lon = (float(v) for v in np.mean(placed, axis=0))
        return images


def _folders(root: Path) -> _Collector:
    out = _Collector(root, "folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no species folders, no {MANIFEST} and no Camtrap DP package")
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            out.skipped[f"empty species folder {folder.name!r}"] += 1
        for path in files:
            out.add(str(path.relative_to(root)), folder.name, str(path))
    return out


def _manifest(path: Path) -> _Collector:
    rows = _read_csv(path, MANIFEST_COLUMNS)
    out = _Collector(path.parent, "manifest")
    for number, row in enumerate(rows, start=2):
        where = f"{path}, row {number}"
        if not row["species"].strip():
            out.skipped["row without species"] += 1
            continue
        lat, lon = np.nan, np.nan
        if row.get("lat") and row.get("lon"):
            lat, lon = check_coordinate(row["lat"], "lat", where), check_coordinate(row["lon"], "lon", where)
        out.add(row["file"], row["species"].strip(), where, lat, lon)
    return out


def _camtrap_dp(root: Path) -> _Collector:
    deployments = _read_csv(root / "deployments.csv", ("deploymentID", "latitude", "longitude"))
    media = _read_csv(root / "media.csv", ("mediaID", "deploymentID", "filePath"))
    observations = _read_csv(root / "observations.csv", ("mediaID", "scientificName"))
    where_of = {}
    for number, row in enumerate(deployments, start=2):
        where = f"{root / 'deployments.csv'}, row {number}"
        where_of[row["deploymentID"]] = (
            check_coordinate(row["latitude"], "latitude", where),
            check_coordinate(row["longitude"], "longitude", where),
        )
    media_of = {row["mediaID"]: (row["filePath"], row["deploymentID"], n) for n, row in enumerate(media, start=2)}
    out = _Collector(root, "camtrap-dp")
    for number, row in enumerate(observations, start=2):
        where = f"{root / 'observations.csv'}, row {number}"
        media_id, name = row["mediaID"].strip(), row["scientificName"].strip()
        if not media_id or not name:
            out.skipped["observation without media or species"] += 1
            continue
        if media_id not in media_of:
            raise ValueError(f"{where}, field 'mediaID': {media_id!r} is not in media.csv")
        file, deployment, media_row = media_of[media_id]
        if "://" in file:
            out.skipped["remote media (URL)"] += 1
            continue
        if deployment not in where_of:
            raise ValueError(
                f"{root / 'media.csv'}, row {media_row}, field 'deploymentID': {deployment!r} is not in deployments.csv"
            )
        out.add(file, name, where, *where_of[deployment])
    return out


def read_device_images(path: Path, species_names: list[str] | None) -> DeviceImages:
    """The labelled images at `path` (a folder in any of the layouts, or a manifest CSV), mapped onto
    `species_names`; with None, every species found is a class (a server's own labelled folder)."""
    if path.is_file() and path.suffix.lower() == ".csv":
        found = _manifest(path)
    elif not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (node config 'data')")
    elif (path / "observations.csv").is_file() or (path / "datapackage.json").is_file():
        found = _camtrap_dp(path)
    elif (path / MANIFEST).is_file():
        found = _manifest(path / MANIFEST)
    else:
        found = _folders(path)
    images = found.done(species_names)
    if not images.files:
        unknown = ", ".join(sorted(images.unknown_species)) or "none"
        raise ValueError(f"{path}: no image of a species of this run (species found that the run lacks: {unknown})")
    return images


def split_of(file: str, fractions: tuple[float, float, float]) -> int:
    """0 train, 1 val, 2 test: a stable function of the file name, so adding images moves none."""
    position = int.from_bytes(hashlib.sha256(file.encode()).digest()[:8], "big") / 2**64
    return 0 if position < fractions[0] else 1 if position < fractions[0] + fractions[1] else 2
