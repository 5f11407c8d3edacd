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
from geomoe.world.availability import Availability
from geomoe.world.clock import FieldClock
from geomoe.world.links import parse_link

FIELD_KEYS = ("availability", "availability_share", "device_speed", "seconds_per_example", "link")
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
    # The field a simulation plays in (simulated clock; a deployment's devices have their own): not part of the data.
    availability: str = "always"  # when a node's link is up: always | daily:HH-HH[,HH-HH] | duty:P | trace .csv
    availability_share: float = 1.0  # share of the nodes (drawn from world.seed) that follow it; the rest: always
    device_speed: float = 1.0  # how many times slower than this machine a device trains (docs: Field links)
    seconds_per_example: float = 0.01  # this machine's training time per example and epoch, evaluation included
    link: str = "wifi"  # lora | iridium | 3g | lte-m | wifi | name:bps:latency_s:overhead_bytes, [@budget: lora@10kB]

    def __post_init__(self) -> None:
        if self.clients not in CLIENT_MODES:
            raise ValueError(f"world.clients={self.clients!r} is not one of {CLIENT_MODES}")
        if not 0 <= self.server_fraction < 1:
            raise ValueError(f"world.server_fraction must lie in [0, 1), got {self.server_fraction}")
        for name in ("device_speed", "seconds_per_example"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"world.{name} must be a finite number > 0, got {getattr(self, name)}")
        if not self.availability.endswith(".csv"):  # a trace is read where the clock runs (the server), not on nodes
            self.field_clock()  # a bad availability spec, share or link fails here, naming the setting

    def field_clock(self) -> FieldClock:
        """The simulated clock of this world's field."""
        try:
            link = parse_link(self.link)
        except ValueError as error:
            raise ValueError(f"world.link: {error}") from None
        availability = Availability(self.availability, self.availability_share, self.seed)
        return FieldClock(availability, link, self.device_speed, self.seconds_per_example)

    def input_size(self) -> int:
        """Side of the images the model sees: generated at the synthetic size, or decoded to `images.size`."""
        return self.synthetic.image_size if self.dataset == "synthetic" else self.images.size

    def key(self) -> str:
        """Identity of the world this config builds from the files as they are now (the image pipeline does
        not change it; a newer annotation or split file does)."""
        data = dataclasses.asdict(self)
        for name in ("images", *FIELD_KEYS):
            data.pop(name)
        data["inputs"] = self.files.fingerprint()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
