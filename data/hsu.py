"""Hsu et al. 2020 federated split CSVs: `user_id,image_id,class,label` (train) and
`image_id,class,label` (test). For iNaturalist-Geo, `user_id` is the S2 cell token."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRAIN_COLUMNS = ["user_id", "image_id", "class", "label"]
TEST_COLUMNS = ["image_id", "class", "label"]


@dataclass
class Split:
    """Rows of a split file; `user_ids` is None for a test file."""

    user_ids: list[str] | None
    image_ids: list[str]
    class_names: list[str]
    labels: np.ndarray


def write_split(
    path: Path, cells: np.ndarray, image_ids: list[str], labels: np.ndarray, class_names: list[str] | None = None
) -> None:
    """Write a train split (one row per example, user_id = cell); `class_names` per row, else species_{label}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TRAIN_COLUMNS)
        names = class_names or [f"species_{int(label)}" for label in labels]
        for cell, image_id, name, label in zip(cells, image_ids, names, labels, strict=True):
            writer.writerow([cell, image_id, name, int(label)])


def read_split(path: Path) -> Split:
    """Read a train or test split, checking the header and every label."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such split file")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header not in (TRAIN_COLUMNS, TEST_COLUMNS):
            raise ValueError(
                f"{path}: header {header} is neither {','.join(TRAIN_COLUMNS)} nor {','.join(TEST_COLUMNS)}"
            )
        is_train = header == TRAIN_COLUMNS
        users, images, names, labels = [], [], [], []
        for row_number, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise ValueError(f"{path}, row {row_number}: {len(row)} fields, expected {len(header)}")
            if is_train:
                users.append(row[0])
                row = row[1:]
            image_id, name, label = row
            try:
                labels.append(int(label))
            except ValueError:
                raise ValueError(f"{path}, row {row_number}, field 'label': {label!r} is not an integer") from None
            images.append(image_id)
            names.append(name)
    return Split(users if is_train else None, images, names, np.array(labels, dtype=np.int64))
