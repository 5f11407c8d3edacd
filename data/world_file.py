"""The world file: a run's data, partition and client splits, computed once and loaded by every client.

Parsing a 600 MB iNat annotation JSON and partitioning it takes minutes; a simulated client must not
repeat it. The server (or `geomoe partition`) writes one `.npz` with every row's file, label, location
and cell, the server's rows and each client's train/val/test rows. Clients load it, checked against
the SHA-256 the server sends, so a stale or foreign file is an error, not a silently different world.
Strings travel as one UTF-8 blob per column (a fixed-width unicode array of 579k paths is ~200 MB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geomoe.data.atomic_file import atomic_write
from geomoe.data.datasets import GeoData
from geomoe.data.synthetic import SyntheticConfig

FORMAT = 1


@dataclass
class Location:
    """One client's cell and its splits (row indices into the world's data)."""

    cell: str
    lat: float
    lon: float
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class WorldContents:
    """What a world file holds."""

    data: GeoData
    cells: np.ndarray  # client cell (str) of every row; "" for rows of the dataset's own test set
    server_rows: np.ndarray  # rows the server keeps for pretraining and expert initialisation
    locations: list[Location]  # clients


def _blob(strings: list[str]) -> np.ndarray:
    return np.frombuffer("\n".join(strings).encode(), dtype=np.uint8)


def _strings(blob: np.ndarray, count: int) -> list[str]:
    if count == 0:
        return []
    return blob.tobytes().decode().split("\n")


def _ragged(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(p) for p in parts])
    return (np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)), offsets


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_world_file(path: Path, world: WorldContents) -> str:
    """Write atomically; returns the file's SHA-256."""
    data = world.data
    arrays = {
        "meta": np.frombuffer(
            json.dumps(
                {
                    "format": FORMAT,
                    "name": data.name,
                    "root": data.root,
                    "rows": len(data.labels),
                    "classes": len(data.class_names),
                    "files": len(data.files),
                    "locations": len(world.locations),
                    "skipped": data.skipped,
                    "synthetic": dataclasses.asdict(data.synthetic) if data.synthetic else None,
                }
            ).encode(),
            dtype=np.uint8,
        ),
        "labels": data.labels.astype(np.int64),
        "lat": data.lat.astype(np.float64),
        "lon": data.lon.astype(np.float64),
        "class_names": _blob(data.class_names),
        "files": _blob(data.files),
        "cells": _blob([str(c) for c in world.cells]),
        "test_rows": np.zeros(0, np.int64) if data.test_rows is None else data.test_rows.astype(np.int64),
        "server_rows": world.server_rows.astype(np.int64),
        "location_cells": _blob([loc.cell for loc in world.locations]),
        "location_coordinates": np.array([[loc.lat, loc.lon] for loc in world.locations], dtype=np.float64),
    }
    for split in ("train", "val", "test"):
        arrays[f"{split}_rows"], arrays[f"{split}_offsets"] = _ragged([getattr(loc, split) for loc in world.locations])
    atomic_write(path, lambda out: np.savez(out, **arrays))
    return sha256_of(path)


def read_world_file(path: Path, sha256: str | None = None) -> WorldContents:
    """The contents of a world file; with `sha256`, refuse a file that is not the one the server wrote."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no world file (the server writes it; clients need its folder)")
    if sha256 is not None and (actual := sha256_of(path)) != sha256:
        raise ValueError(f"{path}: SHA-256 {actual[:12]}... is not the server's {sha256[:12]}...; another run wrote it")
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].tobytes())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: world file format {meta.get('format')} is not {FORMAT}")
        synthetic = SyntheticConfig(**meta["synthetic"]) if meta["synthetic"] else None
        test_rows = npz["test_rows"]
        cells = np.array(_strings(npz["cells"], meta["rows"]), dtype=object)
        data = GeoData(
            meta["name"],
            npz["labels"],
            npz["lat"],
            npz["lon"],
            _strings(npz["class_names"], meta["classes"]),
            _strings(npz["files"], meta["files"]),
            meta["root"],
            cells=cells,
            test_rows=test_rows if test_rows.size else None,
            skipped=meta["skipped"],
            synthetic=synthetic,
        )
        coordinates = npz["location_coordinates"]
        splits = {s: (npz[f"{s}_rows"], npz[f"{s}_offsets"]) for s in ("train", "val", "test")}
        locations = [
            Location(
                cell,
                float(coordinates[i, 0]),
                float(coordinates[i, 1]),
                *(rows[offsets[i] : offsets[i + 1]] for rows, offsets in splits.values()),
            )
            for i, cell in enumerate(_strings(npz["location_cells"], meta["locations"]))
        ]
        return WorldContents(data, cells, npz["server_rows"], locations)
