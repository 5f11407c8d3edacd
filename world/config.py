"""Which data a run's world is built from, how it is partitioned and which cells become clients.

A config only (`geomoe.world.world` builds the world from it), so that the run configuration, which
every node parses, does not pull in the simulator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal, get_args

from geomoe.data.datasets import DataFiles
from geomoe.data.images import ImageConfig
from geomoe.data.synthetic import SyntheticConfig

ClientMode = Literal["locations", "cells"]
CLIENT_MODES = get_args(ClientMode)


@dataclass
class WorldConfig:
    """Which data, how it is split into cells and which cells become clients."""

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys are refused when pydantic builds it from a file

    dataset: str = "synthetic"  # synthetic | inat2017 | inat2021 | iwildcam | hsu
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # used when dataset == "synthetic"
    files: DataFiles = field(default_factory=DataFiles)  # where a file-backed dataset lives
    images: ImageConfig = field(default_factory=ImageConfig)  # decoding, augmentation, cache of image files
    n_max: int = 500  # Hsu et al. N_max: split a cell while its top species has more examples
    clients: ClientMode = "locations"  # "locations": L1..Ln below; "cells": every cell with >= min_examples
    num_locations: int = 6  # cells that become clients in "locations" mode (L1..L6)
    min_separation_deg: float = 20.0  # minimum great-circle distance between chosen cell centres
    min_examples: int = 60  # a client cell needs at least this many examples
    server_fraction: float = 0.3  # share of all examples kept by the server for pretraining
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train / val / test per client
    seed: int = 0  # the world's splits (server, train, val, test); apart from the run's seed: runs compare on one world

    def __post_init__(self) -> None:
        if self.clients not in CLIENT_MODES:
            raise ValueError(f"world.clients={self.clients!r} is not one of {CLIENT_MODES}")
        if not 0 <= self.server_fraction < 1:
            raise ValueError(f"world.server_fraction must lie in [0, 1), got {self.server_fraction}")

    def input_size(self) -> int:
        """Side of the images the model sees: generated at the synthetic size, or decoded to `images.size`."""
        return self.synthetic.image_size if self.dataset == "synthetic" else self.images.size

    def key(self) -> str:
        """Identity of the world this config builds from the files as they are now (the image pipeline does
        not change it; a newer annotation or split file does)."""
        data = dataclasses.asdict(self)
        data.pop("images")
        data["inputs"] = self.files.fingerprint()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
