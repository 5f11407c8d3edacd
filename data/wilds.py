"""iWildCam2020-WILDS `metadata.csv`, with camera coordinates from the competition's GPS file.

WILDS' metadata has one row per photo (`split, location, y, filename`, ...) but no coordinates;
the iWildCam competition ships them per camera location (`{"<location>": {"latitude", "longitude"}}`).
Cameras are grouped into clusters by distance (single linkage), as the geographic MoE paper does;
each cluster is a client.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from geomoe.data.records import GeoRecords, check_coordinate

REQUIRED = ("split", "location", "y", "filename")
EARTH_RADIUS_KM = 6371.0


def load_gps(path: Path) -> dict[str, tuple[float, float]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping location -> {{latitude, longitude}}")
    out = {}
    for location, entry in data.items():
        where = f"{path}, location {location!r}"
        if not isinstance(entry, dict) or "latitude" not in entry or "longitude" not in entry:
            raise ValueError(f"{where}: missing field 'latitude' or 'longitude'")
        out[str(location)] = (
            check_coordinate(entry["latitude"], "latitude", where),
            check_coordinate(entry["longitude"], "longitude", where),
        )
    return out


def camera_clusters(lat: np.ndarray, lon: np.ndarray, radius_km: float) -> np.ndarray:
    """Cluster id per point: cameras within `radius_km` of a chain of neighbours share a cluster."""
    from scipy.cluster.hierarchy import fcluster, linkage  # here, not above: only iWildCam runs load SciPy

    if len(lat) == 1:
        return np.zeros(1, dtype=np.int64)
    xyz = np.stack(
        [
            np.cos(np.radians(lat)) * np.cos(np.radians(lon)),
            np.cos(np.radians(lat)) * np.sin(np.radians(lon)),
            np.sin(np.radians(lat)),
        ],
        axis=1,
    )
    chord = 2 * np.sin(radius_km / EARTH_RADIUS_KM / 2)
    return fcluster(linkage(xyz, method="single"), t=chord, criterion="distance").astype(np.int64) - 1


def load_wilds(metadata: Path, gps: Path, cluster_km: float = 50.0) -> GeoRecords:
    """Photos with a camera location that has coordinates; groups are camera clusters."""
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata}: no such file")
    coordinates = load_gps(gps)
    with metadata.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{metadata}: missing column(s) {missing}; has {reader.fieldnames}")
        rows = list(reader)
    ids, files, lats, lons, ys, locations = [], [], [], [], [], []
    skipped: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        try:
            y = int(row["y"])
        except ValueError:
            raise ValueError(f"{metadata}, row {number}, field 'y': {row['y']!r} is not an integer") from None
        location = row["location"]
        if location not in coordinates:
            skipped["camera without coordinates"] = skipped.get("camera without coordinates", 0) + 1
            continue
        lat, lon = coordinates[location]
        ids.append(row.get("image_id") or row["filename"])
        files.append(row["filename"])
        lats.append(lat)
        lons.append(lon)
        ys.append(y)
        locations.append(location)
    classes = sorted(set(ys))
    index_of = {c: i for i, c in enumerate(classes)}
    lat_array, lon_array = np.array(lats), np.array(lons)
    groups = np.zeros(0, dtype=np.int64)
    if locations:
        cameras = sorted(set(locations))
        camera_cluster = camera_clusters(
            np.array([coordinates[c][0] for c in cameras]), np.array([coordinates[c][1] for c in cameras]), cluster_km
        )
        cluster_of = dict(zip(cameras, camera_cluster, strict=True))
        groups = np.array([cluster_of[c] for c in locations], dtype=np.int64)
    return GeoRecords(
        ids,
        files,
        lat_array,
        lon_array,
        np.array([index_of[y] for y in ys], dtype=np.int64),
        [str(c) for c in classes],
        groups=groups,
        skipped=skipped,
    )
