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
    labels: np.ndarray  # run species id per file
    layout: str  # folders | manifest | camtrap-dp
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
    """Accumulates (file, species) pairs, counting unknown species and skips."""

    def __init__(self, root: Path, species: SpeciesIndex, layout: str) -> None:
        self.images = DeviceImages(root, [], np.zeros(0, np.int64), layout)
        self.species, self.labels = species, []
        self.lats: list[float] = []
        self.lons: list[float] = []

    def add(self, file: str, name: str, where: str) -> None:
        if not (self.images.root / file).is_file():
            raise FileNotFoundError(f"{where}, field 'file': {self.images.root / file} does not exist")
        label = self.species.get(name)
        if label is None:
            self.images.unknown_species[name] += 1
            return
        self.images.files.append(file)
        self.labels.append(label)

    def done(self) -> DeviceImages:
        self.images.labels = np.array(self.labels, dtype=np.int64)
        if self.lats:
            self.images.lat, self.images.lon = float(np.mean(self.lats)), float(np.mean(self.lons))
        return self.images


def _folders(root: Path, species: SpeciesIndex) -> DeviceImages:
    out = _Collector(root, species, "folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no species folders, no {MANIFEST} and no Camtrap DP package")
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            out.images.skipped[f"empty species folder {folder.name!r}"] += 1
        for path in files:
            out.add(str(path.relative_to(root)), folder.name, str(path))
    return out.done()


def _manifest(path: Path, species: SpeciesIndex) -> DeviceImages:
    rows = _read_csv(path, MANIFEST_COLUMNS)
    out = _Collector(path.parent, species, "manifest")
    for number, row in enumerate(rows, start=2):
        where = f"{path}, row {number}"
        if not row["species"].strip():
            out.images.skipped["row without species"] += 1
            continue
        out.add(row["file"], row["species"].strip(), where)
        if row.get("lat") and row.get("lon"):
            out.lats.append(check_coordinate(row["lat"], "lat", where))
            out.lons.append(check_coordinate(row["lon"], "lon", where))
    return out.done()


def _camtrap_dp(root: Path, species: SpeciesIndex) -> DeviceImages:
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
    out = _Collector(root, species, "camtrap-dp")
    for number, row in enumerate(observations, start=2):
        where = f"{root / 'observations.csv'}, row {number}"
        media_id, name = row["mediaID"].strip(), row["scientificName"].strip()
        if not media_id or not name:
            out.images.skipped["observation without media or species"] += 1
            continue
        if media_id not in media_of:
            raise ValueError(f"{where}, field 'mediaID': {media_id!r} is not in media.csv")
        file, deployment, media_row = media_of[media_id]
        if "://" in file:
            out.images.skipped["remote media (URL)"] += 1
            continue
        if deployment not in where_of:
            raise ValueError(
                f"{root / 'media.csv'}, row {media_row}, field 'deploymentID': {deployment!r} is not in deployments.csv"
            )
        out.add(file, name, where)
        out.lats.append(where_of[deployment][0])
        out.lons.append(where_of[deployment][1])
    return out.done()


def read_device_images(path: Path, species_names: list[str]) -> DeviceImages:
    """The labelled images at `path` (a folder in any of the layouts, or a manifest CSV)."""
    species = SpeciesIndex(species_names)
    if path.is_file() and path.suffix.lower() == ".csv":
        images = _manifest(path, species)
    elif not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (node config 'data')")
    elif (path / "observations.csv").is_file() or (path / "datapackage.json").is_file():
        images = _camtrap_dp(path, species)
    elif (path / MANIFEST).is_file():
        images = _manifest(path / MANIFEST, species)
    else:
        images = _folders(path, species)
    if not images.files:
        unknown = ", ".join(sorted(images.unknown_species)) or "none"
        raise ValueError(f"{path}: no image of a species of this run (species found that the run lacks: {unknown})")
    return images


def split_of(file: str, fractions: tuple[float, float, float]) -> int:
    """0 train, 1 val, 2 test: a stable function of the file name, so adding images moves none."""
    position = int.from_bytes(hashlib.sha256(file.encode()).digest()[:8], "big") / 2**64
    return 0 if position < fractions[0] else 1 if position < fractions[0] + fractions[1] else 2
