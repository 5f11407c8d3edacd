"""iNaturalist 2017 and 2021 annotation JSON (COCO-like: `images`, `annotations`, `categories`).

2017 keeps coordinates in a separate locations JSON (a list of `{"id", "lat", "lon", ...}` keyed
by image id); 2021 has `latitude` / `longitude` on each image. Images whose coordinates are null
are counted, not silently dropped; a malformed file is an error naming file, record and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from geomoe.data.records import GeoRecords, check_coordinate


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None


def _field(record: dict, name: str, where: str) -> Any:
    if not isinstance(record, dict) or name not in record:
        raise ValueError(f"{where}: missing field '{name}'")
    return record[name]


def load_inat(annotations: Path, locations: Path | None = None) -> GeoRecords:
    """Observations of an iNat 2017 (with `locations`) or 2021 (coordinates on images) annotation file."""
    data = _load_json(annotations)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"{annotations}: missing list '{key}'")
    coordinates: dict[Any, tuple[Any, Any]] = {}
    if locations is not None:
        entries = _load_json(locations)
        if not isinstance(entries, list):
            raise ValueError(f"{locations}: expected a list of {{id, lat, lon}} records")
        for row, entry in enumerate(entries):
            where = f"{locations}, record {row}"
            coordinates[_field(entry, "id", where)] = (_field(entry, "lat", where), _field(entry, "lon", where))
    categories = sorted(_field(c, "id", f"{annotations}, categories[{i}]") for i, c in enumerate(data["categories"]))
    names = {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]}
    index_of = {cid: i for i, cid in enumerate(categories)}
    images: dict[Any, dict] = {}
    for row, image in enumerate(data["images"]):
        images[_field(image, "id", f"{annotations}, images[{row}]")] = image
    kept_ids, files, lats, lons, labels = [], [], [], [], []
    skipped: dict[str, int] = {}
    for row, annotation in enumerate(data["annotations"]):
        where = f"{annotations}, annotations[{row}]"
        image_id = _field(annotation, "image_id", where)
        category = _field(annotation, "category_id", where)
        if image_id not in images:
            raise ValueError(f"{where}, field 'image_id': {image_id!r} is not in 'images'")
        if category not in index_of:
            raise ValueError(f"{where}, field 'category_id': {category!r} is not in 'categories'")
        image = images[image_id]
        if locations is not None:
            if image_id not in coordinates:
                raise ValueError(f"{locations}: image id {image_id!r} (from {where}) has no location record")
            lat, lon = coordinates[image_id]
            source = f"{locations}, id {image_id!r}"
            lat_name, lon_name = "lat", "lon"
        else:
            source = f"{annotations}, images id {image_id!r}"
            lat, lon = _field(image, "latitude", source), _field(image, "longitude", source)
            lat_name, lon_name = "latitude", "longitude"
        if lat is None or lon is None:
            skipped["without coordinates"] = skipped.get("without coordinates", 0) + 1
            continue
        lats.append(check_coordinate(lat, lat_name, source))
        lons.append(check_coordinate(lon, lon_name, source))
        kept_ids.append(str(image_id))
        files.append(str(image.get("file_name", "")))
        labels.append(index_of[category])
    return GeoRecords(
        kept_ids,
        files,
        np.array(lats),
        np.array(lons),
        np.array(labels, dtype=np.int64),
        [names[c] for c in categories],
        skipped=skipped,
    )
