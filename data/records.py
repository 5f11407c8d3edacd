"""Geotagged observations loaded from a real dataset: what every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GeoRecords:
    """Observations with a usable location; `skipped` counts the rest by reason (never silent)."""

    image_ids: list[str]  # dataset image ids
    file_names: list[str]  # image paths relative to the dataset root
    lat: np.ndarray  # degrees, float64
    lon: np.ndarray  # degrees, float64
    labels: np.ndarray  # contiguous class index 0..C-1
    class_names: list[str]  # name of each class index
    groups: np.ndarray | None = None  # optional group per row (camera cluster for iWildCam)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows without usable location

    def __len__(self) -> int:
        return len(self.image_ids)

    def report(self) -> str:
        """One line a person can read: kept rows and skipped rows by reason."""
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"{len(self)} observations with a location; skipped: {skipped}"


def check_coordinate(value: object, field_name: str, where: str) -> float:
    """A float within the field's range, or a ValueError naming where it came from."""
    limit = 90.0 if field_name.startswith("lat") else 180.0
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}, field '{field_name}': {value!r} is not a number") from None
    if not -limit <= number <= limit or number != number:
        raise ValueError(f"{where}, field '{field_name}': {number} is outside [-{limit:g}, {limit:g}]")
    return number
