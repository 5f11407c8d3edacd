"""The synthetic world written in the published formats, so the real-format path runs with nothing downloaded.

- `inat2017`: `train_val_images/<supercategory>/<species>/<id>.jpg`, `train2017.json` (COCO-like images,
  annotations, categories) and `train2017_locations.json` (`id, lat, lon, date, ...` per image);
- `inat2021`: `train/<species>/<id>.jpg` and `train.json` with `latitude`/`longitude` on each image;
- `hsu`: the inat2017 files plus Hsu et al.'s split CSVs: `federated_train_geo.csv` (`user_id` = S2 cell of
  the world's partition, `image_id`, `class`, `label` = iNat category id) and `test.csv`;
- `iwildcam`: WILDS `metadata.csv` (camera `location` on a 2-degree grid) + `gps_locations.json` + `train/`;
- `folders`: one device folder per client location, `L<k>/<species>/<id>.jpg`, and `locations.csv`
  (name, cell, lat, lon) saying where each device stands.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from geomoe.data.datasets import GeoData
from geomoe.data.hsu import TEST_COLUMNS, TRAIN_COLUMNS
from geomoe.data.synthetic import SyntheticGeoSpecies
from geomoe.world.config import WorldConfig
from geomoe.world.world import World

FORMATS = ("inat2017", "inat2021", "hsu", "iwildcam", "folders")
SUPERCATEGORY = "Synthetica"
TEST_SHARE = 0.2  # hsu: share of rows in test.csv (the published test set is iNat's validation images)
CAMERA_GRID_DEG = 2.0  # iwildcam: observations on one grid square share a camera location


def write_jpeg(generator: SyntheticGeoSpecies, row: int, path: Path, quality: int = 92) -> None:
    pixels = (generator.image(row).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=quality)


def _write_images(generator: SyntheticGeoSpecies, rows: Iterable[int], paths: list[Path], progress: bool) -> None:
    pairs: Iterable = zip(rows, paths, strict=True)
    if progress:
        from rich.progress import track

        pairs = track(list(pairs), description=f"writing {len(paths)} JPEGs")
    for row, path in pairs:
        write_jpeg(generator, int(row), path)


def _dump(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _inat(data: GeoData, generator: SyntheticGeoSpecies, out: Path, year: int, progress: bool) -> dict:
    rows = np.arange(len(data.labels))
    names = data.class_names
    if year == 2017:
        files = [f"train_val_images/{SUPERCATEGORY}/{names[data.labels[r]]}/{r}.jpg" for r in rows]
    else:
        files = [f"train/{r // 1000:05d}_{names[data.labels[r]]}/{r}.jpg" for r in rows]
    _write_images(generator, rows, [out / f for f in files], progress)
    size = generator.cfg.image_size
    images = [
        {"id": int(r), "width": size, "height": size, "file_name": files[r], "license": 0, "rights_holder": "geomoe"}
        for r in rows
    ]
    if year == 2021:
        for image, r in zip(images, rows, strict=True):
            image |= {"latitude": float(data.lat[r]), "longitude": float(data.lon[r]), "date": "2021-01-01 00:00:00"}
    document = {
        "info": {"year": year, "version": "geomoe synthetic export", "description": "synthetic geo-species world"},
        "images": images,
        "annotations": [{"id": int(r), "image_id": int(r), "category_id": int(data.labels[r])} for r in rows],
        "categories": [{"id": i, "name": n, "supercategory": SUPERCATEGORY} for i, n in enumerate(names)],
        "licenses": [{"id": 0, "name": "synthetic", "url": ""}],
    }
    written = {}
    if year == 2017:
        _dump(out / "train2017.json", document)
        locations = [
            {
                "id": int(r),
                "lat": float(data.lat[r]),
                "lon": float(data.lon[r]),
                "date": "2017-01-01 00:00:00+00:00",
                "date_c": 2017.0,
                "loc_uncert": 10,
            }
            for r in rows
        ]
        _dump(out / "train2017_locations.json", locations)
        written = {"annotations": "train2017.json", "locations": "train2017_locations.json"}
    else:
        _dump(out / "train.json", document)
        written = {"annotations": "train.json"}
    return {"images": len(rows), "root": ".", **written}


def _hsu(world: World, generator: SyntheticGeoSpecies, out: Path, progress: bool) -> dict:
    summary = _inat(world.data, generator, out, 2017, progress)
    rng = np.random.default_rng(world.cfg.seed + 1)
    is_test = rng.random(len(world.data.labels)) < TEST_SHARE
    with (out / "federated_train_geo.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TRAIN_COLUMNS)
        for r in np.flatnonzero(~is_test):
            writer.writerow([world.cells[r], int(r), int(world.data.labels[r]), int(world.data.labels[r])])
    with (out / "test.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TEST_COLUMNS)
        for r in np.flatnonzero(is_test):
            writer.writerow([int(r), int(world.data.labels[r]), int(world.data.labels[r])])
    return summary | {
        "train_split": "federated_train_geo.csv",
        "test_split": "test.csv",
        "test_rows": int(is_test.sum()),
    }


def _iwildcam(data: GeoData, generator: SyntheticGeoSpecies, out: Path, progress: bool) -> dict:
    grid_lat = np.floor(data.lat / CAMERA_GRID_DEG).astype(int)
    grid_lon = np.floor(data.lon / CAMERA_GRID_DEG).astype(int)
    squares = sorted(set(zip(grid_lat.tolist(), grid_lon.tolist(), strict=True)))
    camera_of = {square: i for i, square in enumerate(squares)}
    rows = np.arange(len(data.labels))
    files = [f"{r:08d}.jpg" for r in rows]
    _write_images(generator, rows, [out / "train" / f for f in files], progress)
    with (out / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["", "split", "location_remapped", "location", "sequence", "datetime", "y", "image_id", "filename"]
        )
        for r in rows:
            camera = camera_of[(int(grid_lat[r]), int(grid_lon[r]))]
            writer.writerow(
                [
                    int(r),
                    "train",
                    camera,
                    camera,
                    f"seq-{r}",
                    "2020-01-01 00:00:00.000",
                    int(data.labels[r]),
                    f"{r:08d}",
                    files[r],
                ]
            )
    gps = {
        str(i): {"latitude": (a + 0.5) * CAMERA_GRID_DEG, "longitude": (b + 0.5) * CAMERA_GRID_DEG}
        for (a, b), i in camera_of.items()
    }
    _dump(out / "gps_locations.json", gps)
    return {
        "images": len(rows),
        "root": "train",
        "metadata": "metadata.csv",
        "gps": "gps_locations.json",
        "cameras": len(gps),
    }


def _folders(world: World, generator: SyntheticGeoSpecies, out: Path, progress: bool, only: list[int] | None) -> dict:
    chosen = only if only is not None else list(range(len(world.locations)))
    names = world.data.class_names
    rows, paths = [], []
    for k in chosen:
        location = world.locations[k]
        for r in np.concatenate([location.train, location.val, location.test]):
            rows.append(int(r))
            paths.append(out / f"L{k + 1}" / names[world.data.labels[r]] / f"{r}.jpg")
    _write_images(generator, rows, paths, progress)
    with (out / "locations.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "cell", "lat", "lon"])
        for k in chosen:
            location = world.locations[k]
            writer.writerow([f"L{k + 1}", location.cell, f"{location.lat:.6f}", f"{location.lon:.6f}"])
    return {"images": len(rows), "devices": [f"L{k + 1}" for k in chosen], "locations": "locations.csv"}


def location_at(world: World, lat: float, lon: float) -> int:
    """Index of the world's location whose cell holds (lat, lon); a clear error if none does."""
    from geomoe.data.cells import cell_holding

    index = cell_holding([location.cell for location in world.locations], lat, lon)
    if index is not None:
        return index
    raise ValueError(f"lat={lat} lon={lon} lies in none of the world's locations")


def export_world(
    cfg: WorldConfig, fmt: str, out: Path, locations: list[int] | None = None, progress: bool = False
) -> dict:
    """Write the synthetic world of `cfg` in format `fmt` under `out`; a summary of what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    if cfg.dataset != "synthetic":
        raise ValueError(f"only the synthetic world is exported; world.dataset is {cfg.dataset!r}")
    world = World(cfg)
    generator = SyntheticGeoSpecies(cfg.synthetic)
    out.mkdir(parents=True, exist_ok=True)
    if fmt in ("inat2017", "inat2021"):
        summary = _inat(world.data, generator, out, int(fmt[-4:]), progress)
    elif fmt == "hsu":
        summary = _hsu(world, generator, out, progress)
    elif fmt == "iwildcam":
        summary = _iwildcam(world.data, generator, out, progress)
    else:
        summary = _folders(world, generator, out, progress, locations)
    summary = {"format": fmt, "out": str(out), "species": len(world.data.class_names), **summary}
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    return summary
